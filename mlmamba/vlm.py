"""ML-Mamba: vision towers -> connector -> Mamba-2 LM, with the visual tokens placed before the
text (no BOS) and the Zephyr chat template (formats.md §1, §4, §5).

    model = MLMamba.from_pretrained("ckpt_dir")            # config.json + model.safetensors
    out = model.generate("cat.jpg", "What is in the image?", max_new_tokens=64)
    print(out.texts[0], out.timing)

Checkpoints: our directory format (save_pretrained / from_pretrained), the official ML-Mamba
`latest-checkpoint.pt` (from_official) and Cobra's projector (load_cobra_projector; Cobra's
Mamba-1 LM is not supported).
"""
import json
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .checkpoint import CheckpointKeyError, load_into, load_state_dict_file, save_safetensors
from .config import Mamba2Config
from .connector import CONNECTORS, build_connector, connector_to_official_keys, \
    official_to_connector_keys
from .lm import Mamba2LM
from .prompt import build_prompt
from .vision import BACKBONES, VisionTowers

__all__ = ["MLMambaConfig", "MLMamba", "VLMOutput", "UnsupportedCheckpointError"]
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
OFFICIAL_PARTS = ("llm_backbone", "mlp", "bidirectional_mamba", "projector")
VISION_WIDTHS = {2176: "dinosiglip-vit-so-384px", 1152: "siglip-vit-so400m-384px",
                 1024: "dinov2-vit-l-384px"}


class UnsupportedCheckpointError(ValueError):
    pass


@dataclass
class MLMambaConfig:
    lm: Mamba2Config = field(default_factory=Mamba2Config)
    vision_backbone: str = "dinosiglip-vit-so-384px"
    image_size: int = 384
    vision_overrides: dict = field(default_factory=dict)  # tower -> timm kwargs (tiny towers)
    connector: str = "msc-bsm"
    scan_orders: object = None        # None: the connector's own; a scan_orders name or list
    connector_layers: int = 2
    connector_swiglu: bool = True     # advanced (LayerNorm -> SwiGLU) or basic (mixer only) blocks
    connector_d_state: int = 128
    connector_d_conv: int = 4
    connector_expand: int = 2
    connector_headdim: int = 64
    connector_ngroups: int = 1

    def __post_init__(self):
        if isinstance(self.lm, dict):
            self.lm = Mamba2Config.from_dict(self.lm)
        if self.vision_backbone not in BACKBONES:
            raise ValueError(f"MLMambaConfig: vision_backbone {self.vision_backbone!r}, expected "
                             f"one of {sorted(BACKBONES)}")
        if self.connector not in CONNECTORS:
            raise ValueError(f"MLMambaConfig: connector {self.connector!r}, expected one of "
                             f"{CONNECTORS}")

    def mixer_kwargs(self):
        return dict(d_state=self.connector_d_state, d_conv=self.connector_d_conv,
                    expand=self.connector_expand, headdim=self.connector_headdim,
                    ngroups=self.connector_ngroups)

    def to_dict(self):
        d = asdict(self)
        d["lm"] = self.lm.to_dict()
        if isinstance(self.scan_orders, torch.Tensor):
            d["scan_orders"] = self.scan_orders.tolist()
        return {"model_type": "mlmamba", **d}

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        kind = d.pop("model_type", "mlmamba")
        if kind != "mlmamba":
            raise ValueError(f"MLMambaConfig: config.json has model_type {kind!r}, expected 'mlmamba'")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"MLMambaConfig: unknown config keys {unknown}")
        return cls(**d)

    @classmethod
    def tiny(cls, **overrides):
        """A tiny configuration for tests and smoke runs: 2-layer LM of width 64 (vocab 257), tiny
        timm towers at 70 px (5x5 patches), connector with d_state 8."""
        lm = Mamba2Config(d_model=64, n_layer=2, vocab_size=257, d_state=16, headdim=16,
                          chunk_size=16, pad_vocab_size_multiple=16)
        towers = {"dino": dict(embed_dim=32, depth=3, num_heads=2),
                  "siglip": dict(embed_dim=48, depth=3, num_heads=2)}
        backbone = overrides.get("vision_backbone", "dinosiglip-vit-so-384px")
        kw = dict(lm=lm, image_size=70, connector_d_state=8, connector_headdim=16,
                  vision_overrides={n: towers[n] for n in BACKBONES.get(backbone, ())})
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def ml_mamba(cls, **overrides):
        """The published ML-Mamba: DINOv2-L + SigLIP-so400m at 384 px, msc-bsm, mamba2-2.7b."""
        return cls(lm=Mamba2Config.preset("2.7b"), **overrides)


@dataclass
class VLMOutput:
    """generate() result: new token ids (b, n) (pad after eos), texts, each row's text prompt
    ids (after its visual tokens) and a timing breakdown (seconds)."""
    new_tokens: torch.Tensor
    texts: list
    prompt_ids: list = None
    timing: dict = field(default_factory=dict)


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class MLMamba(nn.Module):
    def __init__(self, config: MLMambaConfig, device=None, dtype=None, vision_weights=None):
        super().__init__()
        self.config = c = config
        kw = {"device": device, "dtype": dtype}
        self.vision = VisionTowers(c.vision_backbone, c.image_size, c.vision_overrides,
                                   vision_weights)
        self.vision.to(**{k: v for k, v in kw.items() if v is not None})
        self.connector = build_connector(
            c.connector, self.vision.embed_dim, c.lm.d_model, self.vision.grid, c.scan_orders,
            c.connector_layers, c.connector_swiglu, c.mixer_kwargs(), **kw)
        self.lm = Mamba2LM(c.lm, **kw)
        self.tokenizer = None

    @property
    def device(self):
        return self.lm.device

    @property
    def dtype(self):
        return self.lm.dtype

    # -- images -> visual tokens -------------------------------------------------------------
    def encode_images(self, images, timing=None):
        """Images (see VisionTowers.to_unit_pixels) -> visual tokens (b, num_patches, d_model)."""
        dev = self.device
        t0 = _now(dev)
        pixels = self.vision.preprocess(images, device=dev)
        t1 = _now(dev)
        with torch.no_grad() if self.vision.frozen else torch.enable_grad():
            feats = self.vision(pixels)
        t2 = _now(dev)
        tokens = self.connector(feats.to(self.connector_dtype()))
        t3 = _now(dev)
        if timing is not None:
            timing["preprocess_s"] = timing.get("preprocess_s", 0.0) + t1 - t0
            timing["vision_s"] = timing.get("vision_s", 0.0) + t2 - t1
            timing["connector_s"] = timing.get("connector_s", 0.0) + t3 - t2
        return tokens.to(self.dtype)

    def connector_dtype(self):
        return next(self.connector.parameters()).dtype

    # -- prompts -----------------------------------------------------------------------------
    def _rows(self, images, prompts):
        """Normalise (images, prompts) to a list of (list of images, prompt) rows."""
        if isinstance(prompts, str):
            prompts = [prompts]
            if images is None:
                images = [None]
            elif isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] > 1:
                images = [list(images)]  # several images for one prompt
            elif isinstance(images, (list, tuple)):
                images = [list(images)]
            else:
                images = [images]
        else:
            prompts = list(prompts)
            if images is None:
                images = [None] * len(prompts)
            elif isinstance(images, torch.Tensor) and images.dim() == 4:
                images = list(images)
            elif not isinstance(images, (list, tuple)):
                raise ValueError("generate: with a list of prompts, images must be a list with "
                                 "one entry (image, list of images or None) per prompt")
            if len(images) != len(prompts):
                raise ValueError(f"generate: got {len(images)} image entries for "
                                 f"{len(prompts)} prompts")
        rows = []
        for im, p in zip(images, prompts):
            if not isinstance(p, str):
                raise TypeError(f"generate: prompt must be a str, got {type(p).__name__}")
            ims = [] if im is None else (list(im) if isinstance(im, (list, tuple)) else [im])
            rows.append((ims, p))
        return rows

    def _tokenizer(self, tokenizer):
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("MLMamba: no tokenizer: load the model from a directory with "
                             "tokenizer.json, or pass tokenizer=")
        return tok

    def prepare(self, images, prompts, tokenizer=None, chat_template=True, timing=None):
        """Prompt embeddings for generation: (embeds (b, L, d_model) left-padded, mask (b, L)
        bool or None when no row is padded, text ids per row). Row r is [its visual tokens ;
        embedding of its prompt ids], no BOS."""
        tok = self._tokenizer(tokenizer)
        rows = self._rows(images, prompts)
        texts = [tok.encode(build_prompt(p) if chat_template else p) for _, p in rows]
        flat = [im for ims, _ in rows for im in ims]
        vis = self.encode_images(flat, timing) if flat else None  # (n_images, P, d)
        P, dev = self.vision.num_patches, self.device
        lengths = [len(ims) * P + len(t) for (ims, _), t in zip(rows, texts)]
        if min(lengths) == 0:
            raise ValueError("generate: a row has neither an image nor prompt tokens")
        L = max(lengths)
        embeds = torch.zeros(len(rows), L, self.config.lm.d_model, device=dev, dtype=self.dtype)
        k = 0
        for r, ((ims, _), ids) in enumerate(zip(rows, texts)):
            start = L - lengths[r]
            if ims:
                embeds[r, start:start + len(ims) * P] = vis[k:k + len(ims)].flatten(0, 1)
                k += len(ims)
            if ids:
                embeds[r, L - len(ids):] = self.lm.backbone.embedding(
                    torch.tensor(ids, device=dev))
        mask = None
        if min(lengths) != L:
            mask = torch.arange(L, device=dev)[None] >= \
                (L - torch.tensor(lengths, device=dev))[:, None]
        return embeds, mask, texts

    # -- generation --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, image=None, prompt="", max_new_tokens=128, tokenizer=None,
                 chat_template=True, eos_token_id="default", **gen_kwargs):
        """Answer `prompt` about `image`.

        image: a path, PIL image or (3,H,W) tensor; a list of them (several images for one
          prompt); None for text only. With a list of prompts: one entry per prompt (image,
          list of images or None), or a (b,3,H,W) tensor. Visual tokens come before the text.
        gen_kwargs: everything generation.generate takes (temperature, top_k, top_p,
          repetition_penalty, stop_strings, callback, cuda_graph, generator, ssm_state_dtype...).
        Returns VLMOutput: new_tokens (b, n), texts, prompt_ids, timing (preprocess, vision,
        connector, prefill, decode seconds; decode tokens/s; total).
        """
        from .generation import generate as lm_generate

        tok = self._tokenizer(tokenizer)
        if eos_token_id == "default":
            eos_token_id = tok.eos_token_id if tok.eos_token_id is not None \
                else self.config.lm.eos_token_id
        timing = {}
        t0 = _now(self.device)
        embeds, mask, texts = self.prepare(image, prompt, tok, chat_template, timing)
        ids = None
        if gen_kwargs.get("repetition_penalty", 1.0) != 1.0:
            # ids aligned with embeds for the penalty: non-text positions repeat a text token
            b, L = embeds.shape[:2]
            ids = torch.empty(b, L, dtype=torch.long)
            for r, t in enumerate(texts):
                ids[r] = t[-1] if t else self.config.lm.pad_token_id
                if t:
                    ids[r, L - len(t):] = torch.tensor(t)
        out = lm_generate(self.lm, ids, max_new_tokens=max_new_tokens, attention_mask=mask,
                          eos_token_id=eos_token_id, tokenizer=tok,
                          pad_token_id=self.config.lm.pad_token_id, inputs_embeds=embeds,
                          **gen_kwargs)
        t1 = _now(self.device)
        n_new = out.new_tokens.shape[1]
        timing.update(prefill_s=out.prefill_s, decode_s=out.decode_s,
                      prefill_tokens=sum(out.prompt_lengths), new_tokens=n_new,
                      decode_tokens_per_s=out.decode_tokens_per_s, total_s=t1 - t0,
                      end_to_end_tokens_per_s=n_new / max(t1 - t0, 1e-12),
                      used_cuda_graph=out.used_cuda_graph)
        return VLMOutput(new_tokens=out.new_tokens, texts=out.texts, prompt_ids=texts,
                         timing=timing)

    def forward(self, input_ids, images=None, num_last_tokens=0):
        """Logits (b, k*P + l, vocab) for rows [visual tokens ; input_ids] (training / scoring;
        pad on the right, as the official training does). input_ids (b, l) text ids; images:
        a (b,3,H,W) tensor, or one entry per row (an image or a list of k images), or None."""
        emb = self.lm.backbone.embedding(input_ids)
        if images is not None:
            if isinstance(images, torch.Tensor):
                rows = [[im] for im in (images if images.dim() == 4 else images[None])]
            else:
                rows = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
            if len(rows) != emb.shape[0] or len({len(r) for r in rows}) != 1:
                raise ValueError(f"MLMamba.forward: expected the same number of images for each "
                                 f"of the {emb.shape[0]} rows, got {[len(r) for r in rows]}")
            vis = self.encode_images([im for r in rows for im in r])
            vis = vis.reshape(emb.shape[0], -1, vis.shape[-1])
            emb = torch.cat([vis.to(emb.dtype), emb], dim=1)
        return self.lm(inputs_embeds=emb, num_last_tokens=num_last_tokens)

    # -- our directory format ----------------------------------------------------------------
    def save_pretrained(self, path):
        """path/config.json + model.safetensors (+ tokenizer.json if the model has a tokenizer)."""
        os.makedirs(path, exist_ok=True)
        sd = self.state_dict()
        if self.config.lm.tie_embeddings:
            sd.pop("lm.lm_head.weight", None)
        save_safetensors(sd, path)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        if self.tokenizer is not None:
            self.tokenizer.tok.save(os.path.join(path, TOKENIZER_FILE))

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """Load our directory format. dtype None keeps the checkpoint's dtype."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"MLMamba.from_pretrained: {path} is not a directory")
        cfg_file = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(cfg_file):
            if any(f.endswith((".pt", ".pth", ".ckpt")) for f in os.listdir(path)):
                raise FileNotFoundError(f"MLMamba.from_pretrained: {path} has no {CONFIG_FILE}; for an "
                                        f"official latest-checkpoint.pt use MLMamba.from_official")
            raise FileNotFoundError(f"MLMamba.from_pretrained: no {CONFIG_FILE} in {path}")
        with open(cfg_file) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"MLMamba.from_pretrained: {cfg_file} is not valid JSON ({e})") from None
        if raw.get("model_type") != "mlmamba":
            raise ValueError(f"MLMamba.from_pretrained: {cfg_file} is not an mlmamba VLM config "
                             f"(model_type {raw.get('model_type')!r}); for a text-only Mamba-2 LM "
                             f"use Mamba2LM.from_pretrained")
        config = MLMambaConfig.from_dict(raw)
        weights = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"MLMamba.from_pretrained: no {WEIGHTS_FILE} in {path}")
        sd = load_state_dict_file(weights)
        if dtype is None:
            dtype = sd["lm.backbone.embedding.weight"].dtype if "lm.backbone.embedding.weight" in sd \
                else torch.float32
        device = torch.device("cpu" if device is None else device)
        with torch.device("meta"):
            model = cls(config, dtype=dtype)
        ignore = ("lm.lm_head.weight",) if config.lm.tie_embeddings else ()
        if config.lm.tie_embeddings:
            sd.pop("lm.lm_head.weight", None)
        load_into(model, sd, what=f"MLMamba.from_pretrained({path})", ignore_missing=ignore,
                  device=device, dtype=dtype)
        model.lm.tie_weights()
        tok_file = os.path.join(path, TOKENIZER_FILE)
        if os.path.isfile(tok_file):
            from .tokenizer import Tokenizer
            model.tokenizer = Tokenizer.from_pretrained(tok_file)
        return model.eval()

    # -- official ML-Mamba / Cobra checkpoints -------------------------------------------------
    @staticmethod
    def read_official(path):
        """The `model` dict of an official latest-checkpoint.pt (torch.load, weights_only=True)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such checkpoint file {path}")
        try:
            try:  # mmap: tensors are read lazily (a 12 GB file needs no 12 GB of RAM up front)
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # saved in the legacy format
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{path}: not a torch checkpoint of plain tensors (read with "
                             f"torch.load(weights_only=True))") from None
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                             f"{first})") from None
        if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
            ckpt = ckpt["model"]
        if not isinstance(ckpt, dict) or not all(isinstance(v, dict) for v in ckpt.values()):
            raise UnsupportedCheckpointError(
                f"{path}: expected an ML-Mamba/Cobra checkpoint whose 'model' entry holds the "
                f"sub-dicts {OFFICIAL_PARTS}")
        return ckpt

    @classmethod
    def official_config(cls, parts, **overrides):
        """An MLMambaConfig inferred from the official sub-dicts' shapes (ngroups 1)."""
        llm, mlp, bim = parts["llm_backbone"], parts["mlp"], parts["bidirectional_mamba"]
        lm = _lm_config_from_shapes(llm)
        vis = mlp["0.weight"].shape[1]
        layers = sorted({int(k.split(".")[1]) for k in bim if k.startswith("layers.")})
        m = "layers.0.mixer."
        nheads = bim[m + "A_log"].shape[0]
        d_inner = bim[m + "norm.weight"].shape[0]
        kw = dict(lm=lm, connector="msc-bsm", connector_layers=len(layers),
                  connector_swiglu="layers.0.mlp.w1.weight" in bim,
                  connector_d_state=(bim[m + "conv1d.weight"].shape[0] - d_inner) // 2,
                  connector_d_conv=bim[m + "conv1d.weight"].shape[-1],
                  connector_expand=d_inner // lm.d_model, connector_headdim=d_inner // nheads,
                  connector_ngroups=1)
        if "vision_backbone" not in overrides:
            if vis not in VISION_WIDTHS:
                raise UnsupportedCheckpointError(
                    f"official checkpoint: vision width {vis} matches no known backbone "
                    f"{VISION_WIDTHS}; pass vision_backbone/vision_overrides")
            kw["vision_backbone"] = VISION_WIDTHS[vis]
        kw.update(overrides)
        return MLMambaConfig(**kw)

    @classmethod
    def from_official(cls, path, tokenizer=None, vision_weights=None, device=None,
                      dtype=torch.float32, **config_overrides):
        """Load the official ML-Mamba latest-checkpoint.pt.

        tokenizer: the GPT-NeoX tokenizer.json (file or directory) of xiuyul/mamba-2.8b-zephyr.
        vision_weights: {"dino": file/dir, "siglip": file/dir} of the timm towers (they are not
          in the checkpoint); without them the towers keep random weights (a warning says so).
        config_overrides: MLMambaConfig fields (e.g. tiny vision_overrides for tests).
        """
        parts = cls.read_official(path)
        kind = official_kind(parts)
        if kind == "cobra":
            raise UnsupportedCheckpointError(
                f"{path} is a Cobra checkpoint: its LM is Mamba-1 (mamba-2.8b-zephyr), which "
                f"mlmamba does not support; load only its projector with "
                f"MLMamba.load_cobra_projector into a model with connector='mlp'")
        if kind != "ml-mamba":
            raise UnsupportedCheckpointError(
                f"{path}: expected the ML-Mamba sub-dicts {OFFICIAL_PARTS}, found {sorted(parts)}")
        config = cls.official_config(parts, **config_overrides)
        if not vision_weights:
            warnings.warn("MLMamba.from_official: no vision_weights given; the vision towers "
                          "have random weights", stacklevel=2)
        device = torch.device("cpu" if device is None else device)
        with torch.device("meta"):
            model = cls(config, dtype=dtype)
        model.vision = VisionTowers(config.vision_backbone, config.image_size,
                                    config.vision_overrides, vision_weights).to(device, dtype)
        model.load_official_parts(parts, device=device, dtype=dtype, what=f"from_official({path})")
        if tokenizer is not None:
            from .tokenizer import Tokenizer
            model.tokenizer = Tokenizer.from_pretrained(tokenizer)
        return model.eval()

    def load_official_parts(self, parts, device=None, dtype=None, what="official checkpoint"):
        """Load the four official sub-dicts into the connector and LM (strict, names every
        missing / unexpected key and shape mismatch). A stored lm_head.weight is ignored when
        the embeddings are tied (warned about if it differs from the embedding)."""
        llm = dict(parts["llm_backbone"])
        if self.config.lm.tie_embeddings and "lm_head.weight" in llm:
            head, emb = llm.pop("lm_head.weight"), llm.get("backbone.embedding.weight")
            if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
                warnings.warn(f"{what}: llm_backbone lm_head.weight differs from the embedding; "
                              f"it is ignored (the LM ties them)", stacklevel=3)
        conn = official_to_connector_keys(parts["mlp"], parts["bidirectional_mamba"],
                                          parts["projector"])
        ignore = ("lm_head.weight",) if self.config.lm.tie_embeddings else ()
        load_into(self.lm, llm, what=f"{what} llm_backbone", ignore_missing=ignore,
                  device=device, dtype=dtype)
        self.lm.tie_weights()
        load_into(self.connector, conn, what=f"{what} mlp/bidirectional_mamba/projector",
                  device=device, dtype=dtype)
        for name, buf in list(self.connector.named_buffers()):
            if buf.is_meta:
                raise RuntimeError(f"{what}: connector buffer {name} left on meta")

    def official_state_dict(self):
        """This model's connector and LM in the official layout: {llm_backbone, mlp,
        bidirectional_mamba, projector} (msc-bsm with 2 scan orders only)."""
        if self.config.connector == "mlp" or self.connector.orders.shape[0] != 2:
            raise ValueError("official_state_dict: the official format holds an msc-bsm connector "
                             "(2 scan orders)")
        mlp, bim, proj = connector_to_official_keys(self.connector.state_dict())
        return {"llm_backbone": self.lm.state_dict(), "mlp": mlp, "bidirectional_mamba": bim,
                "projector": proj}

    def load_cobra_projector(self, path):
        """Load Cobra's `projector` (FusedMLPProjector(vision width -> d_model)) into an 'mlp'
        connector. Cobra's llm_backbone (Mamba-1) is not loaded."""
        if self.config.connector != "mlp":
            raise ValueError(f"load_cobra_projector: the model's connector is "
                             f"{self.config.connector!r}; Cobra's projector needs connector='mlp'")
        parts = self.read_official(path)
        if "projector" not in parts:
            raise UnsupportedCheckpointError(f"{path}: no 'projector' sub-dict (found {sorted(parts)})")
        p = self.connector.projector
        load_into(p, parts["projector"], what=f"load_cobra_projector({path})",
                  device=p[0].weight.device, dtype=p[0].weight.dtype)
        return self


def official_kind(parts):
    """'ml-mamba', 'cobra' or None for the sub-dicts of an official checkpoint."""
    keys = set(parts)
    if keys >= set(OFFICIAL_PARTS):
        return "ml-mamba"
    if "projector" in keys and not keys & {"mlp", "bidirectional_mamba"}:
        return "cobra"
    return None


def _lm_config_from_shapes(llm):
    """A Mamba2Config from a state-spaces Mamba-2 state dict's shapes (ngroups 1, vocab 50277
    when padded to 50288)."""
    if any(".mixer.x_proj." in k or ".mixer.dt_proj." in k for k in llm):
        raise UnsupportedCheckpointError("llm_backbone is a Mamba-1 LM (x_proj/dt_proj mixers); "
                                         "only Mamba-2 is supported")
    if "backbone.embedding.weight" not in llm:
        raise CheckpointKeyError("llm_backbone", missing=["backbone.embedding.weight"])
    vocab_padded, d_model = llm["backbone.embedding.weight"].shape
    layers = {int(k.split(".")[2]) for k in llm if k.startswith("backbone.layers.")}
    m = "backbone.layers.0.mixer."
    nheads = llm[m + "A_log"].shape[0]
    d_inner = llm[m + "norm.weight"].shape[0]
    conv_dim, _, d_conv = llm[m + "conv1d.weight"].shape
    vocab = 50277 if vocab_padded == 50288 else vocab_padded
    return Mamba2Config(d_model=d_model, n_layer=len(layers), vocab_size=vocab,
                        d_state=(conv_dim - d_inner) // 2, d_conv=d_conv,
                        expand=d_inner // d_model, headdim=d_inner // nheads, ngroups=1,
                        pad_vocab_size_multiple=16)
