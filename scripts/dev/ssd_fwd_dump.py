"""Dump the SSD forward's outputs (and msc_scan's) on fixed inputs, or compare two dumps bit for
bit: an A/B between two builds of csrc/ssd/fwd* that must give the same numbers (a change of
layout or scheduling, such as the sequence split's shared chunk-vector pre-pass).

  python3 scripts/dev/ssd_fwd_dump.py dump OUT.pt        # GPU, the build under test importable
  python3 scripts/dev/ssd_fwd_dump.py compare A.pt B.pt  # exit 1 if any output differs

Inputs are drawn on the CPU from fixed seeds, then moved to the GPU.
"""
import sys

import torch

# (name, b, l, h, g, initial states, final states, A scale): the split cases first (b * h <
# SMs); A scale 0.01: slow decay, so the incoming states of the split's segments matter
CASES = [
    ("split_b1_L16384_h80", 1, 16384, 80, 1, False, True, 1.0),
    ("split_b1_L8192_h40_slow", 1, 8192, 40, 1, True, True, 0.01),
    ("split_b1_L5000_h24_init", 1, 5000, 24, 1, True, True, 1.0),
    ("split_b2_L3000_h16_g2", 2, 3000, 16, 2, True, False, 1.0),
    ("b4_L2048_h80", 4, 2048, 80, 1, False, True, 1.0),
    ("b32_L576_h32", 32, 576, 32, 1, True, True, 1.0),
]


def make(seed, b, l, h, g, init, ascale):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(x=r(b, l, h, 64).bfloat16(), dt=r(b, l, h), A=-(torch.rand(h, generator=gen) + 0.05) * ascale,
             B=r(b, l, g, 128).bfloat16(), C=r(b, l, g, 128).bfloat16(), D=r(h),
             dt_bias=r(h) * 0.5, initial_states=r(b, h, 64, 128) if init else None)
    return {k: None if v is None else v.cuda() for k, v in t.items()}


def dump(path):
    from mlmamba_kernels import msc_scan, ssd_scan
    from bench.bench_msc import make_inputs
    out = {}
    for i, (name, b, l, h, g, init, fin, ascale) in enumerate(CASES):
        t = make(2000 + i, b, l, h, g, init, ascale)
        got = ssd_scan(**t, dt_softplus=True, return_final_states=fin)
        out[name] = [v.cpu() for v in (got if fin else (got,))]
        print(name, "done", flush=True)
    for kind in ("cross", "bidirectional", "random"):
        a = make_inputs(4, 24, 24, 8, 64, 128, kind, "cuda", torch.bfloat16, 7)
        out[f"msc_{kind}"] = [msc_scan(**a).cpu()]
        print(f"msc_{kind} done", flush=True)
    torch.save(out, path)


def compare(pa, pb):
    a, b = torch.load(pa), torch.load(pb)
    bad = 0
    for name in a:
        for j, (u, v) in enumerate(zip(a[name], b[name])):
            if not torch.equal(u.view(torch.int16) if u.dtype == torch.bfloat16 else u.view(torch.int32),
                               v.view(torch.int16) if v.dtype == torch.bfloat16 else v.view(torch.int32)):
                bad += 1
                d = (u.float() - v.float()).abs()
                print(f"{name}[{j}] differs: {int((d > 0).sum())} elements, max {d.max().item():.3g}")
    print("bitwise equal" if bad == 0 else f"{bad} outputs differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    {"dump": lambda: dump(sys.argv[2]), "compare": lambda: compare(sys.argv[2], sys.argv[3])}[sys.argv[1]]()
