"""The bench harness on CPU: timing, roofline percentages, speed-ups, JSON rows."""
import json
import time

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
