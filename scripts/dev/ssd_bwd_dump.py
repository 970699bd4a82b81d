"""Dump the SSD backward's gradients on fixed inputs, or compare two dumps bit for bit: an A/B
between two builds of csrc/ssd/bwd* that must give the same numbers (a scheduling change such
as the step-2 prefetch, docs/perf-log.md "ssd_scan backward").

  python3 scripts/dev/ssd_bwd_dump.py dump OUT.pt       # GPU, with the build under test importable
  python3 scripts/dev/ssd_bwd_dump.py compare A.pt B.pt # exit 1 if any gradient differs

Inputs are drawn on the CPU from fixed seeds (the same on every machine), then moved to the GPU.
"""
import math
import sys

import torch

from dumps import cli

NAMES = ("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinit")

# (name, b, l, h, g, p, n, dtype, dt dtype, z, cu_seqlens): the bench shape first, then the paths
# of step 2 (cp.async x/dy or not, one or two warp groups, on-chip or global partials)
CASES = [
    ("bench_b4_L2048_h80", 4, 2048, 80, 1, 64, 128, torch.bfloat16, torch.float32, False, None),
    ("bf16_z", 2, 1000, 8, 2, 64, 128, torch.bfloat16, torch.bfloat16, True, None),
    ("fp16_dt16", 2, 777, 6, 1, 64, 64, torch.float16, torch.float16, False, None),
    ("fp32", 1, 500, 5, 1, 32, 64, torch.float32, torch.float32, False, None),
    ("p128_n128", 2, 600, 3, 1, 128, 128, torch.bfloat16, torch.float32, False, None),
    ("p64_n256_global", 1, 700, 3, 1, 64, 256, torch.bfloat16, torch.float32, False, None),
    ("p48_n100", 2, 300, 6, 2, 48, 100, torch.bfloat16, torch.bfloat16, False, None),
    ("cu_seqlens", 1, 1500, 7, 1, 64, 128, torch.bfloat16, torch.bfloat16, False,
     [0, 70, 71, 900, 1500]),
    # the sm_90a chunk kernel (bwd_chunk_wg.cu): head splits with the fp32 workspace, d_state 64
    ("wg_b32_L576_h32", 32, 576, 32, 1, 64, 128, torch.bfloat16, torch.float32, False, None),
    ("wg_n64_g2", 2, 1000, 8, 2, 64, 64, torch.bfloat16, torch.bfloat16, False, None),
]


def make(seed, b, l, h, g, p, n, dtype, dt_dtype, z, cu):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    nseq = b if cu is None else len(cu) - 1
    t = dict(x=r(b, l, h, p).to(dtype), dt=r(b, l, h).to(dt_dtype),
             A=-(torch.rand(h, generator=gen) + 0.05), B=r(b, l, g, n).to(dtype),
             C=r(b, l, g, n).to(dtype), D=r(h), z=r(b, l, h, p).to(dtype) if z else None,
             dt_bias=r(h) * 0.5, init=r(nseq, h, p, n))
    dout, dfin = r(b, l, h, p).to(dtype), r(nseq, h, p, n)
    dev = lambda v: None if v is None else v.cuda()
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
    return {k: dev(v) for k, v in t.items()}, dev(dout), dev(dfin), cu_t


def dump(path):
    import mlmamba_kernels  # noqa: F401  (defines the ops, loads _C)
    from mlmamba_kernels._loader import has_cuda_kernel
    assert has_cuda_kernel("ssd_scan_bwd"), "the CUDA ssd_scan_bwd kernel is not built"
    out = {}
    for i, (name, *shape) in enumerate(CASES):
        t, dout, dfin, cu = make(1000 + i, *shape)
        got = torch.ops.mlmamba.ssd_scan_bwd(
            dout, dfin, t["x"], t["dt"], t["A"], t["B"], t["C"], 256, t["D"], t["z"],
            t["dt_bias"], t["init"], None, cu, True, 0.0, math.inf)
        out[name] = {k: v.cpu() for k, v in zip(NAMES, got)}
        print(name, "done")
    torch.save(out, path)


if __name__ == "__main__":
    cli(dump, __doc__)
