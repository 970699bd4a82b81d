"""The bench harness on CPU: timing, roofline percentages, speed-ups, JSON rows."""
import json
import time
from pathlib import Path

import torch

from bench.common import Context, Roofline, format_row, time_variants, write_json


def test_time_variants_orders_slow_and_fast():
    t = time_variants({"fast": lambda i: None, "slow": lambda i: time.sleep(2e-3)},
                      torch.device("cpu"), nsets=3, reps=5)
    assert 1.5e-3 < t["slow"] < 0.05
    assert t["fast"] < t["slow"] / 10


def test_case_row_and_json(tmp_path):
    ctx = Context(torch.device("cpu"), Roofline("cpu", copy_gbps=10.0, matmul_tflops=1.0), True)
    seen = []
    row = ctx.case("demo", lambda i: seen.append(i), baselines={"torch": lambda i: time.sleep(1e-3)},
                   bytes_moved=10_000_000, flops=1_000_000_000, nsets=2)
    assert set(seen) == {0, 1}  # input sets rotate
    secs = row.us / 1e6
    assert abs(row.pct_copy - 100 * 1e7 / secs / 1e9 / 10.0) < 1e-6 * row.pct_copy
    assert row.speedup["torch"] > 1 and "torch_us" in row.extra
    assert row.case in format_row(row)
    path = tmp_path / "rows.json"
    write_json(path, ctx.roof, ctx.rows)
    data = json.loads(path.read_text())
    assert data["roofline"]["copy_gbps"] == 10.0 and data["rows"][0]["case"] == "demo"


def test_compile_baseline_is_built_or_skipped():
    ctx = Context(torch.device("cpu"), Roofline("cpu", 1.0, 1.0), True)
    x = torch.randn(64)
    b = ctx.baselines(lambda t: (t * 2).sum(), [(x,)])
    assert "torch" in b
    b["torch"](0)
    if "torch.compile" in b:
        b["torch.compile"](0)


def test_rows_carry_their_timing_window_and_clocks_flag_them(tmp_path, capsys):
    """Each row records when it was timed; scripts/bench_clocks.py matches that window with
    nvidia-smi's clock log and names the rows timed below the top clock or while throttled."""
    import runpy
    from datetime import datetime
    ctx = Context(torch.device("cpu"), Roofline("cpu", 10.0, 1.0), True)
    t0 = time.time()
    slow = ctx.case("slow row", lambda i: time.sleep(1e-3))
    ok = ctx.case("steady row", lambda i: time.sleep(1e-3))
    assert t0 <= slow.t_start < slow.t_end <= ok.t_start < ok.t_end <= time.time()
    bench = tmp_path / "bench.json"
    write_json(bench, ctx.roof, ctx.rows)

    def line(t, mhz, reasons):
        stamp = datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        return f"{stamp}, {mhz} MHz, 3201 MHz, 500.00 W, 50, 0x{reasons:016x}\n"
    clocks = tmp_path / "clocks.csv"
    mid = lambda r: (r.t_start + r.t_end) / 2  # noqa: E731
    clocks.write_text(line(slow.t_start - 1, 345, 1) + line(mid(slow), 1500, 4) +
                      line(mid(ok), 1980, 0) + "garbage, line\n")
    capsys.readouterr()  # the rows' own lines
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_clocks.py"
    runpy.run_path(str(script), run_name="not_main")["main"](["x", str(clocks), str(bench)])
    out = capsys.readouterr().out
    assert "max 1980" in out and "0x4" in out
    assert "slow row: SM clock min 1500" in out and "steady row" not in out
