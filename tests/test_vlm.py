"""ML-Mamba VLM on CPU: official / Cobra checkpoint layouts, our format, generation, prompts."""
import json
import os

import pytest
import torch

from mlmamba.checkpoint import CheckpointKeyError
from mlmamba.prompt import ZephyrPrompt, build_prompt
from mlmamba.tokenizer import byte_tokenizer
from mlmamba.vlm import MLMamba, MLMambaConfig, UnsupportedCheckpointError


def tiny_model(seed, **overrides):
    torch.manual_seed(seed)
    model = MLMamba(MLMambaConfig.tiny(**overrides)).eval()
    model.tokenizer = byte_tokenizer()
    return model


def images(gen, n, size=(3, 61, 83)):
    return [torch.rand(size, generator=gen) for _ in range(n)]


def seed_of(gen):
    return int(torch.randint(0, 2**31, (1,), generator=gen))


# -- prompt -------------------------------------------------------------------------------------
def test_zephyr_prompt():
    assert build_prompt("  <image>\nWhat is shown?  ") == \
        "<|user|>\nWhat is shown?<|endoftext|>\n<|assistant|>\n"
    p = ZephyrPrompt()
    p.add_turn("user", "Hi")
    p.add_turn("assistant", "")
    p.add_turn("user", "More")
    assert p.get_prompt() == ("<|user|>\nHi<|endoftext|>\n<|assistant|>\n <|endoftext|>"
                              "\n<|user|>\nMore<|endoftext|>\n<|assistant|>\n")
    assert build_prompt("b", [("a", "x")]) == ("<|user|>\na<|endoftext|>\n<|assistant|>\n"
                                               "x<|endoftext|>\n<|user|>\nb<|endoftext|>\n<|assistant|>\n")
    with pytest.raises(ValueError, match="must be role 'user'"):
        ZephyrPrompt().add_turn("assistant", "x")


# -- the published ML-Mamba: full key list and shapes, on meta ----------------------------------
def official_shapes_from_formats_md():
    """formats.md §1.2-1.5, written out."""
    llm = {"backbone.embedding.weight": (50288, 2560), "backbone.norm_f.weight": (2560,),
           "lm_head.weight": (50288, 2560)}
    for i in range(64):
        p = f"backbone.layers.{i}."
        llm.update({p + "norm.weight": (2560,), p + "mixer.dt_bias": (80,), p + "mixer.A_log": (80,),
                    p + "mixer.D": (80,), p + "mixer.in_proj.weight": (10576, 2560),
                    p + "mixer.conv1d.weight": (5376, 1, 4), p + "mixer.conv1d.bias": (5376,),
                    p + "mixer.norm.weight": (5120,), p + "mixer.out_proj.weight": (2560, 5120)})
    bim = {"norm_f.weight": (2560,), "norm_f.bias": (2560,)}
    for i in range(2):
        p = f"layers.{i}."
        bim.update({p + "norm.weight": (2560,), p + "norm.bias": (2560,),
                    p + "mixer.in_proj.weight": (10576, 2560), p + "mixer.norm.weight": (5120,),
                    p + "mixer.out_proj.weight": (2560, 5120)})
        for s in ("", "_b"):
            bim.update({p + f"mixer.dt_bias{s}": (80,), p + f"mixer.A_log{s}": (80,),
                        p + f"mixer.D{s}": (80,), p + f"mixer.conv1d{s}.weight": (5376, 1, 4),
                        p + f"mixer.conv1d{s}.bias": (5376,)})
        for w in ("w1", "w2", "w3"):
            bim.update({p + f"mlp.{w}.weight": (2560, 2560), p + f"mlp.{w}.bias": (2560,)})
    mlp = {"0.weight": (2560, 2176), "0.bias": (2560,)}
    proj = {"0.weight": (10240, 2560), "0.bias": (10240,), "2.weight": (2560, 10240),
            "2.bias": (2560,), "4.weight": (2560, 2560), "4.bias": (2560,)}
    return {"llm_backbone": llm, "mlp": mlp, "bidirectional_mamba": bim, "projector": proj}


def test_full_size_official_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = MLMamba(MLMambaConfig.ml_mamba())
    assert all(p.is_meta for p in model.parameters())
    got = {part: {k: tuple(v.shape) for k, v in sd.items()}
           for part, sd in model.official_state_dict().items()}
    want = official_shapes_from_formats_md()
    assert {k: len(v) for k, v in want.items()} == \
        {"llm_backbone": 579, "mlp": 2, "bidirectional_mamba": 44, "projector": 6}
    for part in want:
        assert got[part] == want[part], part
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.lm) == 2_702_599_680
    assert count(model.connector.layers) + count(model.connector.norm_f) == 119_834_560
    assert count(model.connector.mlp) == 5_573_120
    assert count(model.connector.projector) == 58_997_760
    # vision (formats.md §5): DINO first, 27x27 patches, second-to-last block, prefix dropped
    v = model.vision
    assert v.names == ("dino", "siglip") and v.grid == (27, 27) and v.embed_dim == 2176
    dino, siglip = v.towers["dino"], v.towers["siglip"]
    assert (dino.embed_dim, len(dino.blocks), dino.num_prefix_tokens) == (1024, 23, 5)
    assert (siglip.embed_dim, len(siglip.blocks), siglip.num_prefix_tokens) == (1152, 26, 0)


# -- official checkpoint at a tiny width ---------------------------------------------------------
def tiny_official_parts(gen, cfg, vision_dim):
    """Official-layout sub-dicts for `cfg` sizes, names written from formats.md."""
    lm = cfg.lm
    V, d, din, nh = lm.padded_vocab_size, lm.d_model, lm.d_inner, lm.nheads
    cd, inproj = lm.conv_dim, 2 * lm.d_inner + 2 * lm.d_state + lm.nheads
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    llm = {"backbone.embedding.weight": r(V, d), "backbone.norm_f.weight": r(d)}
    for i in range(lm.n_layer):
        p = f"backbone.layers.{i}."
        llm.update({p + "norm.weight": r(d), p + "mixer.dt_bias": r(nh), p + "mixer.A_log": r(nh),
                    p + "mixer.D": r(nh), p + "mixer.in_proj.weight": r(inproj, d),
                    p + "mixer.conv1d.weight": r(cd, 1, lm.d_conv), p + "mixer.conv1d.bias": r(cd),
                    p + "mixer.norm.weight": r(din), p + "mixer.out_proj.weight": r(d, din)})
    llm["lm_head.weight"] = llm["backbone.embedding.weight"].clone()
    cdin, cnh = cfg.connector_expand * d, cfg.connector_expand * d // cfg.connector_headdim
    ccd = cdin + 2 * cfg.connector_d_state
    bim = {"norm_f.weight": r(d), "norm_f.bias": r(d)}
    for i in range(cfg.connector_layers):
        p = f"layers.{i}."
        bim.update({p + "norm.weight": r(d), p + "norm.bias": r(d),
                    p + "mixer.in_proj.weight": r(2 * cdin + 2 * cfg.connector_d_state + cnh, d),
                    p + "mixer.norm.weight": r(cdin), p + "mixer.out_proj.weight": r(d, cdin)})
        for s in ("", "_b"):
            bim.update({p + f"mixer.dt_bias{s}": r(cnh), p + f"mixer.A_log{s}": r(cnh),
                        p + f"mixer.D{s}": r(cnh), p + f"mixer.conv1d{s}.weight": r(ccd, 1, 4),
                        p + f"mixer.conv1d{s}.bias": r(ccd)})
        for w in ("w1", "w2", "w3"):
            bim.update({p + f"mlp.{w}.weight": r(d, d), p + f"mlp.{w}.bias": r(d)})
    mlp = {"0.weight": r(d, vision_dim), "0.bias": r(d)}
    proj = {"0.weight": r(4 * d, d), "0.bias": r(4 * d), "2.weight": r(d, 4 * d), "2.bias": r(d),
            "4.weight": r(d, d), "4.bias": r(d)}
    return {"llm_backbone": llm, "mlp": mlp, "bidirectional_mamba": bim, "projector": proj}


def tiny_vision_kwargs():
    c = MLMambaConfig.tiny()
    return dict(vision_backbone=c.vision_backbone, image_size=c.image_size,
                vision_overrides=c.vision_overrides)


def test_official_checkpoint_tiny_loads_exactly(rng, tmp_path):
    cfg = MLMambaConfig.tiny()
    parts = tiny_official_parts(rng, cfg, vision_dim=80)
    path = tmp_path / "latest-checkpoint.pt"
    torch.save({"model": parts}, path)
    with pytest.warns(UserWarning, match="random weights"):
        model = MLMamba.from_official(path, **tiny_vision_kwargs())
    assert model.config.lm.d_model == 64 and model.config.connector == "msc-bsm"
    assert model.config.lm.n_layer == cfg.lm.n_layer and model.config.lm.headdim == cfg.lm.headdim
    conn = model.connector.state_dict()
    assert torch.equal(conn["layers.1.mixer.conv_weight"][1],
                       parts["bidirectional_mamba"]["layers.1.mixer.conv1d_b.weight"][:, 0])
    assert torch.equal(conn["layers.0.mixer.A_log"][0], parts["bidirectional_mamba"]["layers.0.mixer.A_log"])
    assert model.lm.lm_head.weight is model.lm.backbone.embedding.weight
    back = model.official_state_dict()
    for part, sd in parts.items():
        assert sorted(back[part]) == sorted(sd), part
        for k, v in sd.items():
            assert torch.equal(back[part][k], v), (part, k)
    # the model runs on an image
    out = model.encode_images(torch.rand(3, 70, 70, generator=rng))
    assert out.shape == (1, 25, 64) and torch.isfinite(out).all()


def test_official_checkpoint_errors(rng, tmp_path):
    cfg = MLMambaConfig.tiny()
    parts = tiny_official_parts(rng, cfg, vision_dim=80)
    del parts["bidirectional_mamba"]["layers.1.mlp.w2.bias"]
    parts["llm_backbone"]["backbone.layers.0.mixer.D"] = torch.zeros(3)
    torch.save({"model": parts}, tmp_path / "bad.pt")
    with pytest.warns(UserWarning), pytest.raises(CheckpointKeyError,
                                                  match=r"backbone.layers.0.mixer.D: checkpoint \(3,\)"):
        MLMamba.from_official(tmp_path / "bad.pt", **tiny_vision_kwargs())
    parts["llm_backbone"]["backbone.layers.0.mixer.D"] = torch.zeros(cfg.lm.nheads)
    torch.save({"model": parts}, tmp_path / "bad.pt")
    with pytest.warns(UserWarning), pytest.raises(CheckpointKeyError, match="layers.1.mlp.w2.bias"):
        MLMamba.from_official(tmp_path / "bad.pt", **tiny_vision_kwargs())
    torch.save({"model": {"something": {}}}, tmp_path / "other.pt")
    with pytest.raises(UnsupportedCheckpointError, match="expected the ML-Mamba sub-dicts"):
        MLMamba.from_official(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a (readable )?torch checkpoint"):
        MLMamba.from_official(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        MLMamba.from_official(tmp_path / "missing.pt")


def cobra_parts(gen, vision_dim, d_model, with_llm=True):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    proj = {"0.weight": r(4 * vision_dim, vision_dim), "0.bias": r(4 * vision_dim),
            "2.weight": r(d_model, 4 * vision_dim), "2.bias": r(d_model),
            "4.weight": r(d_model, d_model), "4.bias": r(d_model)}
    parts = {"projector": proj}
    if with_llm:  # Mamba-1 mixer keys (formats.md §4), tiny
        m = "llm.backbone.layers.0.mixer."
        parts["llm_backbone"] = {"llm.backbone.embedding.weight": r(64, 8), m + "A_log": r(16, 4),
                                 m + "x_proj.weight": r(5, 16), m + "dt_proj.weight": r(16, 1)}
    return parts


@pytest.mark.parametrize("with_llm", [True, False])
def test_cobra_checkpoint(rng, tmp_path, with_llm):
    parts = cobra_parts(rng, 80, 64, with_llm)
    path = tmp_path / "cobra.pt"
    torch.save({"model": parts}, path)
    with pytest.raises(UnsupportedCheckpointError, match="Cobra checkpoint: its LM is Mamba-1"):
        MLMamba.from_official(path)
    model = tiny_model(seed_of(rng), connector="mlp")
    model.load_cobra_projector(path)
    for k, v in parts["projector"].items():
        assert torch.equal(model.connector.projector.state_dict()[k], v), k
    with pytest.raises(ValueError, match="needs connector='mlp'"):
        tiny_model(0).load_cobra_projector(path)
    bad = cobra_parts(rng, 48, 64, with_llm)
    torch.save({"model": bad}, path)
    with pytest.raises(CheckpointKeyError, match=r"0.weight: checkpoint \(192, 48\) vs model \(320, 80\)"):
        model.load_cobra_projector(path)


# -- generation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    """A tiny random model; its seed is printed (MLMAMBA_TEST_SEED replays it, as for rng)."""
    seed = int(os.environ.get("MLMAMBA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"model seed={seed} (MLMAMBA_TEST_SEED={seed} replays it)")
    return tiny_model(seed)


def reference_greedy(model, image_list, prompt, n, penalty=1.0):
    """Greedy tokens through model.forward (visual tokens concatenated before the prompt ids),
    re-running the whole sequence each step; HF's repetition penalty on the text tokens seen.
    Like generate, it stops after eos (a random model emits it early for some seeds), so a
    generated row is compared on the reference's length."""
    ids = model.tokenizer.encode(build_prompt(prompt))
    eos = model.tokenizer.eos_token_id
    eos = model.config.lm.eos_token_id if eos is None else eos
    out = []
    with torch.no_grad():
        for _ in range(n):
            images = [image_list] if image_list else None
            logits = model(torch.tensor([ids + out]), images=images)[0, -1, :257].clone()
            for t in set(ids + out):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            out.append(int(logits.argmax()))
            if out[-1] == eos:
                break
    return out


def starts_with(row, ref):
    return row.tolist()[:len(ref)] == ref


def test_generate_greedy_matches_forward_and_is_deterministic(rng, model):
    img = images(rng, 1)[0]
    a = model.generate(img, "Describe the image.", max_new_tokens=6)
    b = model.generate(img, "Describe the image.", max_new_tokens=6)
    assert torch.equal(a.new_tokens, b.new_tokens) and a.texts == b.texts
    assert a.new_tokens.shape == (1, 6) or int(a.new_tokens[0, -1]) == 0
    assert starts_with(a.new_tokens[0], reference_greedy(model, [img], "Describe the image.", 4))
    for key in ("vision_s", "connector_s", "prefill_s", "decode_s", "decode_tokens_per_s", "total_s"):
        assert key in a.timing
    assert a.timing["prefill_tokens"] == 25 + len(model.tokenizer.encode(build_prompt("Describe the image.")))


def test_batch_of_two_equals_each_alone(rng, model):
    ims = images(rng, 2)
    prompts = ["What?", "Tell me a much longer story about this picture."]
    both = model.generate(ims, prompts, max_new_tokens=5)
    for i in range(2):
        alone = model.generate(ims[i], prompts[i], max_new_tokens=5)
        assert both.new_tokens[i].tolist() == alone.new_tokens[0].tolist()
        assert both.texts[i] == alone.texts[0]


def test_multi_image_and_text_only(rng, model):
    ims = images(rng, 2)
    multi = model.generate(ims, "Compare them.", max_new_tokens=3)
    assert starts_with(multi.new_tokens[0], reference_greedy(model, ims, "Compare them.", 2))
    assert multi.timing["prefill_tokens"] == 50 + len(model.tokenizer.encode(build_prompt("Compare them.")))
    pen = model.generate(ims[:1], "Compare them.", max_new_tokens=3, repetition_penalty=1.5)
    assert starts_with(pen.new_tokens[0], reference_greedy(model, ims[:1], "Compare them.", 3, 1.5))
    text = model.generate(None, "Hello there", max_new_tokens=4)
    ids = model.tokenizer.encode(build_prompt("Hello there"))
    lm_out = model.lm.generate([ids], max_new_tokens=4, eos_token_id=0)
    assert text.new_tokens.tolist() == lm_out.new_tokens.tolist()


def test_generate_argument_errors(rng, model):
    with pytest.raises(ValueError, match="got 1 image entries for 2 prompts"):
        model.generate([images(rng, 1)[0]], ["a", "b"], max_new_tokens=1)
    with pytest.raises(FileNotFoundError, match="no such file"):
        model.generate("/nonexistent/cat.png", "a", max_new_tokens=1)
    with pytest.raises(ValueError, match=r"\(3,H,W\) or \(b,3,H,W\)"):
        model.generate(torch.rand(4, 10, 10), "a", max_new_tokens=1)
    bare = tiny_model(0)
    bare.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.generate(None, "a")


# -- our directory format ------------------------------------------------------------------------
def test_save_and_load_pretrained(rng, tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = MLMamba.from_pretrained(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    img = images(rng, 1)[0]
    assert torch.equal(model.generate(img, "hi", max_new_tokens=3).new_tokens,
                       loaded.generate(img, "hi", max_new_tokens=3).new_tokens)
    bf = MLMamba.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and bf.connector_dtype() == torch.bfloat16
    # wrong kinds of directories name the problem
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["connector"] = "msc-csm"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointKeyError, match=r"connector.layers.0.mixer.conv_weight: checkpoint \(2,"):
        MLMamba.from_pretrained(tmp_path / "m")
    model.lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="not an mlmamba VLM config"):
        MLMamba.from_pretrained(tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        MLMamba.from_pretrained(tmp_path / "nothing")


@pytest.mark.parametrize("backbone,connector,swiglu", [
    ("siglip-vit-so400m-384px", "msc-csm", False), ("dinov2-vit-l-384px", "mlp", True)])
def test_single_tower_and_variants(rng, backbone, connector, swiglu):
    m = tiny_model(seed_of(rng), vision_backbone=backbone, connector=connector,
                   connector_swiglu=swiglu)
    assert m.vision.names == (("siglip",) if "siglip" in backbone else ("dino",))
    if connector == "msc-csm":
        assert m.connector.orders.shape == (4, 25) and m.connector.layers[0].mlp is None
        assert not any(".mlp." in k for k in m.state_dict() if k.startswith("connector.layers"))
    out = m.generate(images(rng, 1)[0], "What?", max_new_tokens=2)
    assert out.new_tokens.shape[0] == 1


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_generation_matches_cpu(rng):
    """A tiny-width model with the published head sizes (headdim 64, d_state 128, chunk 256) on
    CUDA (our kernels where built, CUDA graph decode) gives the CPU's greedy tokens in fp32, and
    runs in bf16."""
    import copy

    from mlmamba.config import Mamba2Config
    lm = Mamba2Config(d_model=64, n_layer=2, vocab_size=257, pad_vocab_size_multiple=16)
    model = tiny_model(seed_of(rng), lm=lm)
    ims = images(rng, 2)
    prompts = ["What is it?", "Where is this photo taken, and when?"]
    want = model.generate(ims, prompts, max_new_tokens=8)
    gpu = copy.deepcopy(model).cuda()
    got = gpu.generate(ims, prompts, max_new_tokens=8)
    assert got.timing["used_cuda_graph"]
    assert got.new_tokens.cpu().tolist() == want.new_tokens.tolist()
    emb_cpu = model.encode_images(ims[0])
    torch.testing.assert_close(gpu.encode_images(ims[0]).cpu(), emb_cpu, rtol=2e-4, atol=2e-4)
    bf = gpu.to(torch.bfloat16)
    out = bf.generate(ims, prompts, max_new_tokens=8)
    assert out.new_tokens.shape[0] == 2 and bf.encode_images(ims[0]).dtype == torch.bfloat16
