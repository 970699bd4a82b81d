"""Mamba-2 LM configuration, presets for the published sizes, and conversion from/to the
state-spaces (mamba_ssm ``MambaConfig``) and HF transformers (``Mamba2Config``) config.json files."""

import math
from dataclasses import asdict, dataclass, fields

__all__ = ["Mamba2Config", "PRESETS"]

INF = float("inf")

# d_model, n_layer of the published state-spaces/mamba2-* models (headdim 64, d_state 128, ngroups 1)
PRESETS = {
    "130m": (768, 24),
    "370m": (1024, 48),
    "780m": (1536, 48),
    "1.3b": (2048, 48),
    "2.7b": (2560, 64),
}

# mamba_ssm Mamba2 constructor arguments we accept in ssm_cfg, and our field for each
_SSM_CFG = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "headdim": "headdim",
            "ngroups": "ngroups", "chunk_size": "chunk_size", "dt_limit": "dt_limit",
            "conv_bias": "conv_bias", "bias": "bias", "dt_min": None, "dt_max": None,
            "dt_init_floor": None, "A_init_range": None, "layer": None}


@dataclass
class Mamba2Config:
    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50277
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple = (0.0, INF)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 16
    conv_bias: bool = True
    bias: bool = False
    pad_token_id: int = 0
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        self.dt_limit = tuple(_num(v) for v in self.dt_limit)
        if self.d_inner % self.headdim != 0:
            raise ValueError(f"Mamba2Config: d_inner {self.d_inner} (expand*d_model) is not a multiple of headdim {self.headdim}")
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"Mamba2Config: ngroups {self.ngroups} does not divide nheads {self.nheads}")

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def nheads(self):
        return self.d_inner // self.headdim

    @property
    def conv_dim(self):
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_size_multiple
        return self.vocab_size if m <= 1 else int(math.ceil(self.vocab_size / m) * m)

    @classmethod
    def preset(cls, name, **overrides):
        """One of the published sizes: '130m', '370m', '780m', '1.3b', '2.7b' (with or without the
        'mamba2-' prefix). Keyword overrides replace any field."""
        key = name.lower().removeprefix("mamba2-")
        if key not in PRESETS:
            raise ValueError(f"Mamba2Config.preset: unknown size {name!r}; expected one of {sorted(PRESETS)}")
        d_model, n_layer = PRESETS[key]
        return cls(**{"d_model": d_model, "n_layer": n_layer, **overrides})

    def to_dict(self):
        d = asdict(self)
        d["dt_limit"] = list(self.dt_limit)
        return d

    # -- state-spaces (mamba_ssm MambaConfig) ---------------------------------------------------
    @classmethod
    def from_state_spaces(cls, cfg):
        """From a mamba_ssm ``MambaConfig`` dict (config.json of state-spaces/mamba2-*)."""
        ssm_cfg = dict(cfg.get("ssm_cfg") or {})
        if ssm_cfg.get("layer", "Mamba2") != "Mamba2":
            raise ValueError(f"Mamba2Config: ssm_cfg layer is {ssm_cfg['layer']!r}; only 'Mamba2' is supported")
        if cfg.get("d_intermediate", 0):
            raise ValueError(f"Mamba2Config: d_intermediate={cfg['d_intermediate']} (MLP blocks) is not supported")
        if cfg.get("attn_layer_idx"):
            raise ValueError(f"Mamba2Config: attention layers {cfg['attn_layer_idx']} are not supported")
        if not cfg.get("rms_norm", True):
            raise ValueError("Mamba2Config: rms_norm=false (LayerNorm blocks) is not supported")
        if ssm_cfg.get("d_ssm") is not None or not ssm_cfg.get("rmsnorm", True) \
                or ssm_cfg.get("norm_before_gate", False) or ssm_cfg.get("D_has_hdim", False):
            raise ValueError(f"Mamba2Config: ssm_cfg {ssm_cfg} uses an unsupported Mamba2 variant "
                             f"(d_ssm, rmsnorm=False, norm_before_gate=True or D_has_hdim=True)")
        unknown = sorted(set(ssm_cfg) - set(_SSM_CFG) - {"d_ssm", "rmsnorm", "norm_before_gate", "D_has_hdim"})
        if unknown:
            raise ValueError(f"Mamba2Config: unknown ssm_cfg keys {unknown}")
        kw = {_SSM_CFG[k]: v for k, v in ssm_cfg.items() if _SSM_CFG.get(k)}
        return cls(d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"],
                   residual_in_fp32=cfg.get("residual_in_fp32", True),
                   tie_embeddings=cfg.get("tie_embeddings", True),
                   pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8), **kw)

    def to_state_spaces(self):
        return {
            "d_model": self.d_model, "d_intermediate": 0, "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {"layer": "Mamba2", "d_state": self.d_state, "d_conv": self.d_conv,
                        "expand": self.expand, "headdim": self.headdim, "ngroups": self.ngroups,
                        "chunk_size": self.chunk_size, "dt_limit": list(self.dt_limit),
                        "conv_bias": self.conv_bias, "bias": self.bias},
            "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
            "residual_in_fp32": self.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    # -- HF transformers Mamba2Config ----------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg):
        """From an HF transformers ``Mamba2Config`` dict (model_type 'mamba2'). Its vocab_size is
        already padded, so no further padding is applied."""
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Mamba2Config: hidden_act {act!r} is not supported (only 'silu')")
        d_model, expand, head_dim = cfg["hidden_size"], cfg.get("expand", 2), cfg.get("head_dim", 64)
        num_heads = cfg.get("num_heads")
        if num_heads is not None and num_heads * head_dim != int(expand * d_model):
            raise ValueError(f"Mamba2Config: num_heads*head_dim = {num_heads}*{head_dim} differs from "
                             f"expand*hidden_size = {expand}*{d_model}")
        limit = cfg.get("time_step_limit", (0.0, INF))
        return cls(d_model=d_model, n_layer=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"],
                   d_state=cfg.get("state_size", 128), d_conv=cfg.get("conv_kernel", 4), expand=expand,
                   headdim=head_dim, ngroups=cfg.get("n_groups", 8), chunk_size=cfg.get("chunk_size", 256),
                   dt_limit=tuple(limit), norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                   residual_in_fp32=cfg.get("residual_in_fp32", True),
                   tie_embeddings=cfg.get("tie_word_embeddings", False), pad_vocab_size_multiple=1,
                   conv_bias=cfg.get("use_conv_bias", True), bias=cfg.get("use_bias", False),
                   pad_token_id=_first(cfg.get("pad_token_id"), 0), bos_token_id=_first(cfg.get("bos_token_id"), 0),
                   eos_token_id=_first(cfg.get("eos_token_id"), 0))

    def to_hf(self):
        """An HF transformers Mamba2 config dict; vocab_size is the padded size (as HF's converter does)."""
        return {
            "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
            "hidden_size": self.d_model, "num_hidden_layers": self.n_layer,
            "vocab_size": self.padded_vocab_size, "state_size": self.d_state,
            "conv_kernel": self.d_conv, "expand": self.expand, "head_dim": self.headdim,
            "num_heads": self.nheads, "n_groups": self.ngroups, "chunk_size": self.chunk_size,
            "time_step_limit": list(self.dt_limit),
            "layer_norm_epsilon": self.norm_eps, "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings, "use_conv_bias": self.conv_bias,
            "use_bias": self.bias, "hidden_act": "silu", "rms_norm": True,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    @classmethod
    def from_dict(cls, cfg):
        """Any of: our own to_dict(), an HF Mamba2 config, a state-spaces MambaConfig."""
        if cfg.get("model_type") == "mamba2" or "hidden_size" in cfg:
            return cls.from_hf(cfg)
        if "ssm_cfg" in cfg or "n_layer" in cfg and "d_intermediate" in cfg:
            return cls.from_state_spaces(cfg)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"Mamba2Config.from_dict: unknown keys {unknown}")
        return cls(**cfg)


def _num(v):
    # transformers >= 5 writes inf as {"__float__": "Infinity"}
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


def _first(v, default):
    if isinstance(v, (list, tuple)):
        return v[0] if v else default
    return default if v is None else v
