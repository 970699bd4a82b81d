"""Summarise an ncu source-page CSV (ncu --import R --page source --csv --print-source sass):
the SASS lines with the most stall samples, and the stall reasons they carry.
    python scripts/dev/ncu_top.py source.csv [N]
"""
import csv
import sys


def main():
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f)]
    head_i = next(i for i, r in enumerate(rows) if any("Sampling" in c for c in r))
    head, body = rows[head_i], rows[head_i + 1:]
    col = next(i for i, c in enumerate(head) if c.startswith("Warp Stall Sampling (All"))
    src = next(i for i, c in enumerate(head) if c == "Source")
    stall_cols = [i for i, c in enumerate(head) if c.startswith("stall_") or "Stall" in c and "Sampling" not in c]

    def num(v):
        try:
            return float(v.replace(",", ""))
        except ValueError:
            return 0.0
    total = sum(num(r[col]) for r in body if len(r) > col)
    print(f"total samples {total:.0f}")
    # the kernel's stall reasons over all lines (issued and not-issued samples together)
    sums = {}
    for i in stall_cols:
        k = head[i].replace(" (Not Issued)", "")
        sums[k] = sums.get(k, 0.0) + sum(num(r[i]) for r in body if len(r) > i)
    top = sorted(sums.items(), key=lambda kv: -kv[1])[:10]
    print("reasons: " + ", ".join(f"{k} {v / total * 100:.1f}%" for k, v in top if v))
    body.sort(key=lambda r: -num(r[col]) if len(r) > col else 0)
    for r in body[:n]:
        reasons = sorted(((num(r[i]), head[i]) for i in stall_cols), reverse=True)[:3]
        print(f"{num(r[col]) / total * 100:5.1f}%  {r[src][:60]:<60} " +
              " ".join(f"{k}={v:.0f}" for v, k in reasons if v))


if __name__ == "__main__":
    main()
