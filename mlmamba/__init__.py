"""mlmamba: the model layer over mlmamba_kernels: the Mamba-2 LM (and the ML-Mamba VLM)."""

from .config import Mamba2Config
from .lm import InferenceCache, Mamba2LM
from .mixer import Mamba2Mixer, MixerState
from .norm import RMSNorm, RMSNormGated, rms_norm_gated

__all__ = ["Mamba2Config", "Mamba2LM", "InferenceCache", "Mamba2Mixer", "MixerState",
           "RMSNorm", "RMSNormGated", "rms_norm_gated"]

# the ML-Mamba VLM (its vision towers need timm, imported only when a model is built)
from .vlm import MLMamba, MLMambaConfig  # noqa: E402

__all__ += ["MLMamba", "MLMambaConfig"]
