"""Mamba-2 LM end to end (random weights): decode steps in a CUDA graph at batch 1 and 32, prefill,
generate() tokens/s, and decode memory vs length.

    python -m bench --only lm            (on a GPU: the 2.7b config in bf16)

Decode floor: the bytes one step must move (every weight once; plus the decode states read and
written, which matter at batch 32) over this run's measured copy bandwidth. On CPU a tiny config
runs so the file is exercised in CI.
"""

import torch

from mlmamba import Mamba2Config, Mamba2LM
from mlmamba.generation import DecodeGraph


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once


def state_bytes(cache):
    # a step reads and writes every conv and ssm state
    return 2 * cache.nbytes()


def matmul_flops(model, tokens):
    c = model.config
    mix = model.backbone.layers[0].mixer
    per_tok = c.n_layer * 2 * (mix.in_proj.weight.numel() + mix.out_proj.weight.numel())
    return per_tok * tokens


def decode_case(ctx, model, name, batch, ssm_dtype, baseline_eager):
    dg = DecodeGraph(model, batch, use_graph=ctx.cuda, ssm_state_dtype=ssm_dtype)
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=model.device)
    with torch.inference_mode():
        model(ids[:, None].expand(batch, 16).contiguous(), cache=dg.cache)  # some state to carry
        baselines = {}
        if baseline_eager:
            eager_cache = model.allocate_cache(batch, ssm_dtype=ssm_dtype)
            baselines["eager"] = lambda i: model.step(ids, eager_cache)
        moved = weight_bytes(model) + state_bytes(dg.cache)
        row = ctx.case(name, lambda i: dg.step(ids), baselines=baselines, bytes_moved=moved,
                       extra={"batch": batch, "state_dtype": str(ssm_dtype).replace("torch.", ""),
                              "weight_GB": weight_bytes(model) / 1e9,
                              "state_GB_rw": state_bytes(dg.cache) / 1e9})
    bw = ctx.roof.copy_gbps * 1e9
    row.extra["tokens_per_s"] = batch / (row.us * 1e-6)
    row.extra["floor_us"] = moved / bw * 1e6                         # weights + states
    row.extra["pct_weight_floor"] = 100 * weight_bytes(model) / bw / (row.us * 1e-6)  # the floor
    print(f"    {name}: {row.us:.0f} us/step, {row.extra['tokens_per_s']:.0f} tokens/s; "
          f"{row.pct_copy:.1f}% of the weights+states floor ({row.extra['floor_us']:.0f} us), "
          f"{row.extra['pct_weight_floor']:.1f}% of the weights-only floor", flush=True)
    return row


def run(ctx):
    if ctx.cuda:
        cfg, dtype, prompt_len, prefill_len = Mamba2Config.preset("2.7b"), torch.bfloat16, 800, 2048
    else:
        cfg = Mamba2Config(d_model=128, n_layer=4, vocab_size=1000, d_state=32, headdim=32, chunk_size=64)
        dtype, prompt_len, prefill_len = torch.float32, 32, 128
    torch.manual_seed(0)
    model = Mamba2LM(cfg, device=ctx.device, dtype=dtype).eval()
    tag = "2.7b" if ctx.cuda else "tiny"

    # decode steps (the graph alone: what one generated token costs)
    decode_case(ctx, model, f"lm {tag} decode b1 graph", 1, torch.float32, baseline_eager=True)
    decode_case(ctx, model, f"lm {tag} decode b32 graph bf16-state", 32, torch.bfloat16, baseline_eager=False)
    if not ctx.quick:
        decode_case(ctx, model, f"lm {tag} decode b32 graph fp32-state", 32, torch.float32, baseline_eager=False)

    # prefill of one long prompt (logits of the last token only, as generate does)
    ids = torch.randint(0, cfg.vocab_size, (1, prefill_len), device=ctx.device)
    with torch.inference_mode():
        row = ctx.case(f"lm {tag} prefill 1x{prefill_len}", lambda i: model(ids, num_last_tokens=1),
                       flops=matmul_flops(model, prefill_len))
    row.extra["tokens_per_s"] = prefill_len / (row.us * 1e-6)
    print(f"    prefill: {row.extra['tokens_per_s']:.0f} tokens/s", flush=True)

    # generate() end to end, as users call it (the public stack's setting: 800-token prompt, 256 new)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=ctx.device)
    new = 256 if ctx.cuda else 16
    model.generate(prompt, max_new_tokens=8)  # capture
    out = model.generate(prompt, max_new_tokens=new)
    total = out.prefill_s + out.decode_s
    ctx.note(f"lm {tag} generate b1 {prompt_len}+{new}", decode_tokens_per_s=out.decode_tokens_per_s,
             prefill_tokens_per_s=out.prefill_tokens_per_s, overall_tokens_per_s=new / total,
             ms_per_step=1e3 * out.decode_s / max(new - 1, 1), graph=out.used_cuda_graph)

    # memory: decoding many tokens uses what decoding few does
    if ctx.cuda:
        peaks = {}
        for n in (100, 2000 if ctx.quick else 10000):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            model.generate(prompt, max_new_tokens=n)
            peaks[n] = torch.cuda.max_memory_allocated() / 2**20
        (a, pa), (b, pb) = peaks.items()
        ctx.note(f"lm {tag} decode peak memory {a} vs {b} tokens", **{f"MiB_{a}": pa, f"MiB_{b}": pb,
                                                                      "growth_MiB": pb - pa})
    model._decode_graph = None
