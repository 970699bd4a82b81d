"""Mamba2LM against HF transformers' Mamba2ForCausalLM (its PyTorch path) on tiny random models:
logits, greedy generation, the state-spaces checkpoint layout, the decode cache, left padding,
packed sequences, checkpoint errors. CPU, fp32 (plus smoke checks in bf16/fp16)."""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from mlmamba import Mamba2Config, Mamba2LM, rms_norm_gated
from mlmamba.checkpoint import CheckpointKeyError, load_state_dict_file, save_safetensors
from mlmamba.config import PRESETS

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*falling back.*")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def seed_from(rng):
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


@torch.no_grad()
def randomize_ssm(model, gen):
    """Move the parameters that HF initialises to constants (norm weights, D, conv bias, ...) to
    random values so every term of the layer is exercised."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=gen).log())
        elif name.endswith("dt_bias"):
            dt = torch.empty(p.shape).uniform_(-4.0, -0.7, generator=gen).exp()  # dt in [0.02, 0.5]
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif name.endswith(".D"):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif "norm" in name or name.endswith("conv1d.bias"):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=gen))


def hf_model(rng, n_layer=2, vocab=97, d_model=40, headdim=16, d_state=16, ngroups=1, chunk=8,
             tie=True, d_conv=4):
    """A tiny random transformers Mamba2ForCausalLM (fp32, eval)."""
    from transformers import Mamba2Config as HFConfig, Mamba2ForCausalLM
    cfg = HFConfig(vocab_size=vocab, hidden_size=d_model, state_size=d_state, head_dim=headdim,
                   num_heads=2 * d_model // headdim, expand=2, n_groups=ngroups,
                   num_hidden_layers=n_layer, chunk_size=chunk, tie_word_embeddings=tie,
                   conv_kernel=d_conv, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed_from(rng))
    m = Mamba2ForCausalLM(cfg).eval()
    randomize_ssm(m, rng)
    return m


def ours_from_hf(hf, tmp_path):
    hf.save_pretrained(tmp_path / "hf")
    return Mamba2LM.from_pretrained(tmp_path / "hf")


def random_ids(rng, b, l, vocab):
    return torch.randint(0, vocab, (b, l), generator=rng)


# -- exactness against transformers ----------------------------------------------------------------
@pytest.mark.parametrize("n_layer,tie,d_conv", [(1, True, 4), (3, True, 4), (2, False, 3)])
def test_logits_match_transformers(rng, tmp_path, n_layer, tie, d_conv):
    hf = hf_model(rng, n_layer=n_layer, tie=tie, d_conv=d_conv)
    ours = ours_from_hf(hf, tmp_path)
    assert ours.config.tie_embeddings == tie and ours.config.n_layer == n_layer
    with torch.no_grad():
        for b, l in ((1, 1), (2, 7), (3, 29)):  # chunk_size 8: one partial chunk .. several
            ids = random_ids(rng, b, l, 97)
            ref = hf(ids, use_cache=False).logits
            got = ours(ids)
            assert got.shape == ref.shape == (b, l, 97)
            assert rel_err(got, ref) < 1e-5, (b, l, rel_err(got, ref))


def test_greedy_generation_matches_transformers(rng, tmp_path):
    hf = hf_model(rng, n_layer=2)
    ours = ours_from_hf(hf, tmp_path)
    ids = random_ids(rng, 1, 9, 97)
    # an explicit mask: without one, transformers takes a random token 0 (= pad_token_id) for padding
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, 9:]
    out = ours.generate(ids, max_new_tokens=12)
    assert out.new_tokens[0].tolist() == ref.tolist()
    assert out.sequences.shape == (1, 21)
    assert out.prefill_tokens_per_s > 0 and out.decode_tokens_per_s > 0


def test_repetition_penalty_generation_matches_transformers(rng, tmp_path):
    hf = hf_model(rng, n_layer=1)
    ours = ours_from_hf(hf, tmp_path)
    ids = random_ids(rng, 1, 6, 97)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                      repetition_penalty=1.7, eos_token_id=None, pad_token_id=0)[0, 6:]
    out = ours.generate(ids, max_new_tokens=10, repetition_penalty=1.7)
    assert out.new_tokens[0].tolist() == ref.tolist()


# -- checkpoint layouts ----------------------------------------------------------------------------
def write_state_spaces(hf, path, vocab_size, multiple):
    """The HF model's weights in the state-spaces layout: config.json + pytorch_model.bin."""
    os.makedirs(path, exist_ok=True)
    c = hf.config
    sd = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v.clone()
          for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"].clone()  # official files hold both
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
           "vocab_size": vocab_size, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": multiple,
           "tie_embeddings": True,
           "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "headdim": c.head_dim,
                       "ngroups": c.n_groups, "chunk_size": c.chunk_size, "d_conv": c.conv_kernel}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_state_spaces_layout_same_logits(rng, tmp_path):
    # vocab 101 padded to a multiple of 16 = 112 rows, like 50277 -> 50288
    hf = hf_model(rng, n_layer=2, vocab=112)
    write_state_spaces(hf, tmp_path / "ss", vocab_size=101, multiple=16)
    ours = Mamba2LM.from_pretrained(tmp_path / "ss")
    assert ours.config.vocab_size == 101 and ours.config.padded_vocab_size == 112
    assert ours.lm_head.weight is ours.backbone.embedding.weight
    ids = random_ids(rng, 2, 19, 101)
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids, use_cache=False).logits) < 1e-5


def test_save_pretrained_roundtrip(rng, tmp_path):
    hf = hf_model(rng, n_layer=2)
    ours = ours_from_hf(hf, tmp_path)
    ids = random_ids(rng, 2, 11, 97)
    with torch.no_grad():
        ref = ours(ids)
        for shard in (None, 20_000):  # one file, then model-0000i-of-0000n shards + index
            d = tmp_path / f"ours{shard}"
            ours.save_pretrained(d, max_shard_size=shard)
            assert (d / "model.safetensors.index.json").exists() == (shard is not None)
            again = Mamba2LM.from_pretrained(d)
            assert torch.equal(again(ids), ref)
            # transformers reads what we write
            back = transformers.Mamba2ForCausalLM.from_pretrained(d).eval()
            assert rel_err(back(ids, use_cache=False).logits, ref) < 1e-5


def test_from_pretrained_dtype_and_no_pickle(rng, tmp_path):
    hf = hf_model(rng, n_layer=1)
    write_state_spaces(hf, tmp_path / "ss", vocab_size=97, multiple=1)
    m = Mamba2LM.from_pretrained(tmp_path / "ss", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    # a pickle that runs code is refused by torch.load(weights_only=True)
    bad = tmp_path / "bad.bin"
    torch.save({"w": torch.zeros(1), "f": os.system}, bad)
    with pytest.raises(Exception):
        load_state_dict_file(bad)


def test_checkpoint_key_and_shape_errors(rng, tmp_path):
    hf = hf_model(rng, n_layer=2)
    ours = ours_from_hf(hf, tmp_path)
    base = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}

    def write(sd, name):
        d = tmp_path / name
        save_safetensors({k: v.clone() for k, v in sd.items()}, d)
        (d / "config.json").write_text(json.dumps(ours.config.to_hf()))
        return d

    sd = dict(base)
    del sd["backbone.layers.1.mixer.D"]
    with pytest.raises(CheckpointKeyError, match=r"missing keys \(1\): backbone\.layers\.1\.mixer\.D") as e:
        Mamba2LM.from_pretrained(write(sd, "missing"))
    assert e.value.missing == ["backbone.layers.1.mixer.D"]

    sd = dict(base, **{"backbone.layers.0.mixer.extra": torch.zeros(3)})
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys \(1\): backbone\.layers\.0\.mixer\.extra"):
        Mamba2LM.from_pretrained(write(sd, "unexpected"))

    sd = dict(base)
    sd["backbone.layers.0.mixer.A_log"] = torch.zeros(7)
    with pytest.raises(CheckpointKeyError, match=r"backbone\.layers\.0\.mixer\.A_log: checkpoint \(7,\) vs model \(5,\)"):
        Mamba2LM.from_pretrained(write(sd, "shape"))

    sd = dict(base, **{"lm_head.weight": base["backbone.embedding.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head.weight"):
        Mamba2LM.from_pretrained(write(sd, "untied"))

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        os.makedirs(tmp_path / "empty")
        (tmp_path / "empty" / "config.json").write_text(json.dumps(ours.config.to_hf()))
        Mamba2LM.from_pretrained(tmp_path / "empty")


# -- decode cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ngroups,dt_limit", [(1, (0.0, float("inf"))), (2, (0.05, 0.3))])
def test_prefill_and_steps_match_full_forward(rng, ngroups, dt_limit):
    torch.manual_seed(seed_from(rng))
    cfg = Mamba2Config(d_model=48, n_layer=2, vocab_size=61, d_state=16, headdim=12, ngroups=ngroups,
                       chunk_size=8, dt_limit=dt_limit, pad_vocab_size_multiple=8)
    model = Mamba2LM(cfg).eval()
    randomize_ssm(model, rng)
    b, l, n = 3, 13, 6
    ids = random_ids(rng, b, l + n, cfg.vocab_size)
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(b)
        pre = model(ids[:, :l], cache=cache)
        steps = [model.step(ids[:, l + i], cache) for i in range(n)]
        assert cache.seqlen_offset == l + n
        assert rel_err(pre, full[:, :l]) < 1e-5
        for i, s in enumerate(steps):
            assert rel_err(s, full[:, l + i]) < 1e-5, i
        # chunked prefill: two pieces, the second continuing the first's states, then a step
        cache.reset()
        model(ids[:, :5], cache=cache)
        second = model(ids[:, 5:l], cache=cache)
        assert rel_err(second, full[:, 5:l]) < 1e-5
        assert rel_err(model.step(ids[:, l], cache), full[:, l]) < 1e-5


def test_cache_memory_is_static(rng):
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=16, headdim=16)
    model = Mamba2LM(cfg).eval()
    cache = model.allocate_cache(2)
    ptrs = [(s.conv_state.data_ptr(), s.ssm_state.data_ptr()) for s in cache.states]
    size = cache.nbytes()
    assert size == 2 * 2 * (cfg.conv_dim * 3 * 4 + cfg.nheads * 16 * 16 * 4)
    with torch.no_grad():
        model(random_ids(rng, 2, 9, 50), cache=cache)
        for _ in range(5):
            model.step(random_ids(rng, 2, 1, 50), cache)
    assert [(s.conv_state.data_ptr(), s.ssm_state.data_ptr()) for s in cache.states] == ptrs
    assert cache.nbytes() == size


def test_left_padded_batch_equals_each_prompt_alone(rng, tmp_path):
    hf = hf_model(rng, n_layer=2)
    model = ours_from_hf(hf, tmp_path)
    prompts = [random_ids(rng, 1, n, 97)[0].tolist() for n in (1, 3, 17, 10)]  # 1 and 3 < d_conv
    batch = model.generate(prompts, max_new_tokens=8)
    for i, p in enumerate(prompts):
        alone = model.generate([p], max_new_tokens=8)
        assert batch.new_tokens[i].tolist() == alone.new_tokens[0].tolist(), i
    assert batch.prompt_lengths == [1, 3, 17, 10]
    # the logits too, with a tensor + attention_mask input
    from mlmamba.generation import left_pad
    ids, mask = left_pad(prompts, pad_token_id=5)
    with torch.no_grad():
        cache = model.allocate_cache(len(prompts))
        last = model(ids, cache=cache, mask=mask)[:, -1]
        nxt = model.step(last.argmax(-1), cache)
        for i, p in enumerate(prompts):
            c1 = model.allocate_cache(1)
            alone = model(torch.tensor([p]), cache=c1)[:, -1]
            assert rel_err(last[i], alone[0]) < 1e-5
            assert rel_err(nxt[i], model.step(alone.argmax(-1), c1)[0]) < 1e-5


def test_packed_sequences_cu_seqlens(rng):
    torch.manual_seed(seed_from(rng))
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=53, d_state=16, headdim=16, chunk_size=8)
    model = Mamba2LM(cfg).eval()
    randomize_ssm(model, rng)
    lens = [5, 1, 12, 2]
    seqs = [random_ids(rng, 1, n, 53) for n in lens]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        cache = model.allocate_cache(len(lens))
        packed = model(torch.cat(seqs, 1), cache=cache, cu_seqlens=cu)
        nxt_ids = random_ids(rng, len(lens), 1, 53)
        nxt = model.step(nxt_ids, cache)
        for i, s in enumerate(seqs):
            c1 = model.allocate_cache(1)
            alone = model(s, cache=c1)
            assert rel_err(packed[0, cu[i]:cu[i + 1]], alone[0]) < 1e-5, i
            assert rel_err(nxt[i], model.step(nxt_ids[i], c1)[0]) < 1e-5, i


# -- low precision -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cpu(rng, dtype):
    torch.manual_seed(seed_from(rng))
    cfg = Mamba2Config(d_model=48, n_layer=2, vocab_size=71, d_state=16, headdim=16, chunk_size=8)
    ref = Mamba2LM(cfg).eval()
    randomize_ssm(ref, rng)
    low = Mamba2LM(cfg, dtype=dtype).eval()
    low.load_state_dict(ref.state_dict())
    ids = random_ids(rng, 2, 21, 71)
    with torch.no_grad():
        want = ref(ids)
        got = low(ids)
        assert got.dtype == dtype
        # error of the same model with weights merely rounded to `dtype`, run in fp32
        rounded = Mamba2LM(cfg).eval()
        rounded.load_state_dict({k: v.to(dtype).float() for k, v in ref.state_dict().items()})
        base = rel_err(rounded(ids), want)
        assert rel_err(got, want) < 4 * base + 2e-2
        cache = low.allocate_cache(2)
        low(ids[:, :15], cache=cache)
        for t in range(15, 21):
            s = low.step(ids[:, t], cache)
        assert rel_err(s, got[:, 20]) < 3e-2


# -- pieces ----------------------------------------------------------------------------------------
def test_rms_norm_gated_per_group(rng):
    y = torch.randn(3, 5, 24, generator=rng)[..., ::2]  # non-contiguous, width 12
    z = torch.randn(3, 5, 12, generator=rng)
    w = torch.randn(12, generator=rng)
    for gs in (12, 4, 3):
        h = (y.double() * F.silu(z.double())).unflatten(-1, (12 // gs, gs))
        want = (h / h.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).flatten(-2) * w.double()
        assert rel_err(rms_norm_gated(y, z, w, 1e-5, gs), want) < 1e-6
    with pytest.raises(ValueError, match="group_size 5 does not divide the width 12"):
        rms_norm_gated(y, z, w, group_size=5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name):
    rows = {"130m": 3352, "370m": 4384, "780m": 6448, "1.3b": 8512, "2.7b": 10576}
    cfg = Mamba2Config.preset(name)
    assert cfg.padded_vocab_size == 50288
    with torch.device("meta"):
        m = Mamba2LM(cfg)
    assert m.backbone.layers[0].mixer.in_proj.weight.shape[0] == rows[name]
    if name == "2.7b":  # formats.md: the LLM of ML-Mamba has 2,702,599,680 parameters
        assert sum(p.numel() for p in m.parameters()) == 2_702_599_680
        assert len(m.state_dict()) == 579
    with pytest.raises(ValueError, match="unknown size"):
        Mamba2Config.preset("7b")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_norms_cuda(rng, dtype):
    from mlmamba.norm import add_rms_norm
    x = torch.randn(5, 7, 2 * 331, generator=rng).to("cuda", dtype)[..., ::2]  # odd, strided rows
    r = torch.randn(5, 7, 331, generator=rng).cuda()
    w = torch.randn(331, generator=rng).to("cuda", dtype)
    with torch.no_grad():
        got, got_r = add_rms_norm(x, r, w)                                   # Triton
        s = x.double() + r.double()
        want = s / s.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w.double()
    torch.testing.assert_close(got_r, s.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(got, want) < tol
    y = torch.randn(3, 11, 240, generator=rng).to("cuda", dtype)
    z = torch.randn(3, 11, 480, generator=rng).to("cuda", dtype)[..., 100:340]  # a slice, like in_proj's
    w = torch.randn(240, generator=rng).to("cuda", dtype)
    for gs in (240, 80):
        with torch.no_grad():
            got = rms_norm_gated(y, z, w, 1e-5, gs)
        h = (y.double() * F.silu(z.double())).unflatten(-1, (240 // gs, gs))
        want = (h / h.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).flatten(-2) * w.double()
        assert got.dtype == dtype and rel_err(got, want) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_linear_cuda(rng, dtype):
    from mlmamba.mixer import decode_linear
    for n, k, bias in ((1003, 777, False), (4099, 5120, True), (7, 64, False)):
        lin = torch.nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype)
        x = torch.randn(1, k, generator=rng).to("cuda", dtype)
        with torch.no_grad():
            got = decode_linear(x, lin)
        want = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
        torch_err = rel_err(lin(x), want)
        assert rel_err(got, want) <= 2 * torch_err + 1e-3, (n, k)
