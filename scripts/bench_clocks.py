"""The SM clock while the benchmarks ran, overall and per bench row.

    python3 scripts/bench_clocks.py CLOCKS_CSV [BENCH_JSON]

CLOCKS_CSV: `nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,
clocks_throttle_reasons.active --format=csv,noheader -lms 250` (scripts/gpu_check.sh writes it).
BENCH_JSON: `python -m bench --json`; its rows carry t_start / t_end. Prints the overall
quantiles, then each row timed while the clock sat below its maximum or a throttle reason
other than "idle" (0x1) was active: those rows' timings are suspect.
"""
import json
import os
import statistics
import sys
from datetime import datetime

IDLE = 0x1  # clocks_throttle_reasons: GPU idle


def read_clocks(path):
    out = []  # (unix time, SM MHz, reasons)
    for line in open(path):
        f = [v.strip() for v in line.split(",")]
        if len(f) < 6 or not f[1].split()[0].isdigit():
            continue
        try:
            t = datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local, as bench's time.time()
            out.append((t, float(f[1].split()[0]), int(f[5], 16)))
        except ValueError:
            continue
    return out


def main(argv):
    clocks = read_clocks(argv[1])
    if not clocks:
        print("SM clock: no samples")
        return
    sm = [c[1] for c in clocks]
    top = max(sm)
    q = statistics.quantiles(sm, n=10, method="inclusive") if len(sm) > 1 else [sm[0]]
    print(f"SM clock during the benchmarks (MHz): min {min(sm):.0f}, p10 {q[0]:.0f}, median "
          f"{statistics.median(sm):.0f}, max {top:.0f}; throttle reasons seen: "
          f"{sorted({hex(c[2]) for c in clocks})}")
    if len(argv) < 3 or not os.path.exists(argv[2]):
        return
    flagged = []
    for r in json.load(open(argv[2]))["rows"]:
        if not r.get("t_end"):
            continue
        win = [c for c in clocks if r["t_start"] <= c[0] <= r["t_end"]]
        if not win:
            continue
        low = min(c[1] for c in win)
        reasons = {c[2] for c in win} - {0, IDLE}
        if low < 0.97 * top or reasons:
            flagged.append(f"  {r['case']}: SM clock min {low:.0f} / median "
                           f"{statistics.median(c[1] for c in win):.0f} MHz over {len(win)} samples; "
                           f"reasons {sorted(hex(v) for v in reasons) or '-'}")
    print(f"bench rows timed below {0.97 * top:.0f} MHz or while throttled: {len(flagged) or 'none'}")
    for line in flagged:
        print(line)


if __name__ == "__main__":
    main(sys.argv)
