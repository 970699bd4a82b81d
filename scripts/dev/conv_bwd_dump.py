"""Dump the channel-last conv1d backward's gradients on fixed inputs, or compare two dumps bit
for bit: an A/B between two builds of csrc/conv1d/bwd_chlast* that must give the same numbers
(a scheduling change such as session 24's window without moves, docs/perf-log.md v16).

  python3 scripts/dev/conv_bwd_dump.py dump OUT.pt       # GPU, the build under test importable
  python3 scripts/dev/conv_bwd_dump.py compare A.pt B.pt # exit 1 if any gradient differs

Run `dump` from the root of the tree under test (its mlmamba_kernels is imported first). Inputs
come from a fixed seed; both trees pick their own plan (chunk, layout) unless
MLMAMBA_CONV1D_CHUNK / _TUNE force one.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
import torch  # noqa: E402

from dumps import cli  # noqa: E402

NAMES = ("dx", "dweight", "dbias", "dinit")
# (b, d, l, width, dtype, initial states, seq_idx): the bench shape, edges, every width class
CASES = [(4, 5376, 2048, 4, torch.bfloat16, False, False), (2, 264, 301, 4, torch.bfloat16, False, False),
         (3, 128, 1000, 4, torch.bfloat16, True, True), (1, 520, 37, 3, torch.float16, False, True),
         (2, 256, 4099, 2, torch.float32, True, False), (2, 72, 777, 5, torch.bfloat16, True, False),
         (1, 136, 2048, 8, torch.bfloat16, False, True), (2, 96, 513, 7, torch.float32, True, True),
         (1, 64, 1, 4, torch.bfloat16, True, False), (2, 64, 3, 4, torch.bfloat16, False, True)]


def dump(path):
    import mlmamba_kernels  # noqa: F401
    ops = torch.ops.mlmamba
    g = torch.Generator("cuda").manual_seed(1234)
    out = {}
    for b, d, l, w, dt, init, seq in CASES:
        r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dt)  # noqa: E731
        x = r(b, l, d).transpose(1, 2)
        weight, bias, dout = r(d, w), r(d), r(b, l, d).transpose(1, 2)
        sq = ((torch.rand(b, l, device="cuda", generator=g) < 0.03).int().cumsum(1).to(torch.int32)
              if seq else None)
        ini = r(b, d, w - 1) if init and not seq else None
        dfin = r(b, d, w - 1) if not seq else None
        grads = ops.causal_conv1d_bwd(x, weight, bias, ini, sq, dout, dfin, True)
        out[f"b{b} d{d} l{l} w{w} {str(dt)[6:]}"] = {n: t.cpu() for n, t in zip(NAMES, grads)}
    torch.save(out, path)
    print(f"{len(out)} cases saved to {path}")


if __name__ == "__main__":
    cli(dump, __doc__)
