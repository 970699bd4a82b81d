"""The msc backward tests' conditioning bound over many seeds (tests/test_msc_bwd_gpu.py,
check_grads), on the grids where it matters (1x1 k2, 1x7 k1; every merge, every gradient):
    python3 scripts/dev/msc_grad_bound.py [seeds]   (default 250)
Prints how many gradients are over the bf16 bound (5e-2), how many of those are over 4 sens,
the worst errors with their sens, and the quantiles of error / sens."""
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(root), str(root / "tests")]
import torch  # noqa: E402
import test_msc_bwd_gpu as T  # noqa: E402


def main():
    rows = []  # (error, sens, seed, grid, merge, gradient)
    for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 250):
        for H, W, k in ((1, 1, 2), (1, 7, 1)):
            for merge in ("mean", "sum", None):
                rng = torch.Generator().manual_seed(seed)
                a = T.make(rng, 2, H, W, k, "random")
                dout = torch.randn(T.out_shape(a, merge), device="cuda",
                                   generator=T.cuda_gen(rng)).to(torch.bfloat16)
                got, want = T.grads(a, merge, dout), T.ref_grads(a, merge, dout)
                rounded = T.ref_grads(a, merge, dout, conv=T.conv_rounded)
                for i, name in enumerate(T.NAMES):
                    rows.append((T.rel_err(got[i], want[i]), T.rel_err(rounded[i], want[i]),
                                 seed, f"{H}x{W} k{k}", merge, name))
    over = [r for r in rows if r[0] >= 5e-2]
    print(f"gradients {len(rows)}; over 5e-2: {len(over)}; of those over 4 sens: "
          f"{sum(r[0] >= 4 * r[1] for r in over)}")
    for r in sorted(rows, key=lambda r: r[0], reverse=True)[:8]:
        print("error %.4f sens %.4f ratio %.2f seed %d %s %s %s"
              % (r[0], r[1], r[0] / max(r[1], 1e-30), *r[2:]))
    q = sorted(r[0] / r[1] for r in rows if r[1] > 0)
    print("error / sens quantiles 50/90/99/max: %.2f %.2f %.2f %.2f"
          % (q[len(q) // 2], q[int(0.9 * len(q))], q[int(0.99 * len(q))], q[-1]))


if __name__ == "__main__":
    main()
