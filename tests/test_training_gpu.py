"""Training through the CUDA kernels follows training through the references (issue 5)."""
import copy

import pytest
import torch

import mlmamba_kernels as mk
from mlmamba import Mamba2Config, Mamba2LM

pytestmark = pytest.mark.gpu


def _train(model, batches, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        ids = batches[i % len(batches)]
        logits = model(ids[:, :-1])
        logits = getattr(logits, "logits", logits)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(not torch.cuda.is_available() or
                    mk.build_info()["backends"]["ssd_scan"]["ssd_scan_bwd"] != "cuda",
                    reason="needs the CUDA scan kernels")
def test_two_layer_training_follows_reference():
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    cfg = Mamba2Config(d_model=128, n_layer=2, vocab_size=211, d_state=64, headdim=32,
                       chunk_size=64, pad_vocab_size_multiple=16)
    ref = Mamba2LM(cfg).float()
    ours = copy.deepcopy(ref).cuda()
    batches = [torch.randint(0, 211, (2, 65)) for _ in range(5)]
    loss_ref = _train(ref, batches, 50)                                 # CPU: references
    loss_ours = _train(ours, [b.cuda() for b in batches], 50)            # CUDA kernels
    assert loss_ours[-1] < 0.8 * loss_ours[0], "training through the kernels does not learn"
    for i, (a, b) in enumerate(zip(loss_ours, loss_ref)):
        assert abs(a - b) <= 2e-2 * abs(b) + 1e-3, f"step {i}: loss {a} vs reference {b}"


def test_opcheck_cuda_with_grad():
    if mk.build_info()["backends"]["ssd_scan"]["ssd_scan_fwd"] != "cuda":
        pytest.skip("ssd_scan CUDA kernel not built")
    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, h, p, n = 2, 100, 4, 64, 64

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g).bfloat16().requires_grad_(True)
    args = (r(b, l, h, p), r(b, l, h), (-torch.rand(h, device="cuda")).requires_grad_(True),
            r(b, l, 1, n), r(b, l, 1, n), 64, r(h), None, r(h), None, None, None, True, 0.0,
            float("inf"), False)
    torch.library.opcheck(torch.ops.mlmamba.ssd_scan_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
