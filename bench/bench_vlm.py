"""ML-Mamba end to end (random weights): image + prompt -> 256 new tokens at batch 1, reported as
256 / total seconds the way the paper's Table 3 does (171 tokens/s on an A100 PCIe), with the
breakdown: preprocessing, vision towers, connector, LM prefill, decode.

    python -m bench --only vlm        (on a GPU: DINOv2-L + SigLIP-so400m + msc-bsm + 2.7b, bf16)

Generation runs without an eos stop so that every run makes exactly the same number of tokens.
On CPU a tiny config runs so the file is exercised in CI.
"""
import statistics

import numpy as np
import torch
from torch import nn

from mlmamba.tokenizer import byte_tokenizer
from mlmamba.vlm import MLMamba, MLMambaConfig

PROMPT = "Describe this image in detail."


def linear_flops(module, tokens):
    """2 * (weights of every nn.Linear) * tokens: the matmul work of one forward."""
    return 2 * tokens * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def random_image(seed=0, size=(640, 480)):
    from PIL import Image
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def run(ctx):
    if ctx.cuda:
        cfg, dtype, new, tag = MLMambaConfig.ml_mamba(), torch.bfloat16, 256, "ml-mamba-3b"
    else:
        cfg, dtype, new, tag = MLMambaConfig.tiny(), torch.float32, 16, "tiny"
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = MLMamba(cfg, dtype=dtype).eval()
    model.tokenizer = byte_tokenizer()
    image = random_image()
    dev = ctx.device
    P = model.vision.num_patches

    with torch.inference_mode():
        pixels = {k: v.to(dev, dtype) for k, v in model.vision.preprocess(image).items()}
        ntok = {n: P + t.num_prefix_tokens for n, t in model.vision.towers.items()}
        vflops = sum(linear_flops(model.vision.towers[n], ntok[n]) for n in ntok)
        row = ctx.case(f"vlm {tag} vision towers b1", lambda i: model.vision(pixels), flops=vflops)
        feats = model.vision(pixels)
        cflops = linear_flops(model.connector, P)
        ctx.case(f"vlm {tag} connector {cfg.connector} b1 L{P}", lambda i: model.connector(feats),
                 flops=cflops)
        embeds, _, _ = model.prepare(image, PROMPT)
        L = embeds.shape[1]
        lm_flops = linear_flops(model.lm.backbone, L) + 2 * model.lm.lm_head.weight.numel()
        row = ctx.case(f"vlm {tag} lm prefill 1x{L}",
                       lambda i: model.lm(inputs_embeds=embeds, num_last_tokens=1), flops=lm_flops)
        row.extra["tokens_per_s"] = L / (row.us * 1e-6)

    # end to end, as users call it: image file decode excluded, PIL image in, tokens out
    model.generate(image, PROMPT, max_new_tokens=8, eos_token_id=None)  # warm-up + graph capture
    runs = [model.generate(image, PROMPT, max_new_tokens=new, eos_token_id=None).timing
            for _ in range(2 if ctx.quick else 5)]
    t = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]  # the median run
    assert t["new_tokens"] == new
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    ctx.note(f"vlm {tag} generate b1 image+prompt->{new}",
             paper_tokens_per_s=new / t["total_s"], total_ms=1e3 * t["total_s"],
             preprocess_ms=1e3 * med("preprocess_s"), vision_ms=1e3 * med("vision_s"),
             connector_ms=1e3 * med("connector_s"), prefill_ms=1e3 * med("prefill_s"),
             decode_ms=1e3 * med("decode_s"), decode_tokens_per_s=med("decode_tokens_per_s"),
             prefill_tokens=t["prefill_tokens"], graph=t["used_cuda_graph"])
    model.lm._decode_graph = None
