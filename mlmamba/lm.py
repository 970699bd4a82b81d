"""The Mamba-2 language model: embedding -> n_layer pre-norm Mamba-2 blocks (residual in fp32) ->
final RMSNorm -> lm_head tied to the embedding. Module names follow state-spaces' MambaLMHeadModel,
so its checkpoints load key for key (HF transformers' differ only in 'embeddings').

Parity: in float32 the logits equal transformers' Mamba2ForCausalLM (its PyTorch path) to ~1e-6
relative (tests/test_lm.py). The gated RMSNorm normalises each of the ngroups groups separately, as
mamba_ssm and the CUDA path of transformers do; transformers' PyTorch path normalises over the whole
width instead, so with ngroups > 1 the two differ (all published Mamba-2 LMs have ngroups = 1).
The block norm is mamba_ssm's fused add + norm: the norm reads the fp32 residual (transformers
rounds it to the model dtype first), which only matters in bf16/fp16."""

import math

import torch
from torch import nn

from .config import Mamba2Config
from .mixer import Mamba2Mixer, decode_linear
from .norm import RMSNorm, add_rms_norm

from mlmamba_kernels import nvtx_range as nvtx  # a no-op unless MLMAMBA_NVTX=1

__all__ = ["Mamba2LM", "Mamba2Block", "Mamba2Backbone", "InferenceCache"]


class InferenceCache:
    """Decode state for a whole model: one MixerState per layer, allocated once for a fixed batch.
    Memory does not grow with the number of tokens. `seqlen_offset` counts tokens consumed."""

    def __init__(self, states, batch_size):
        self.states = states
        self.batch_size = batch_size
        self.seqlen_offset = 0

    def reset(self):
        for s in self.states:
            s.zero_()
        self.seqlen_offset = 0
        return self

    def nbytes(self):
        return sum(s.conv_state.nbytes + s.ssm_state.nbytes for s in self.states)

    def __getitem__(self, i):
        return self.states[i]


class Mamba2Block(nn.Module):
    def __init__(self, config, layer_idx, device=None, dtype=None):
        super().__init__()
        c = config
        self.residual_in_fp32 = c.residual_in_fp32
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps, device=device, dtype=dtype)
        self.mixer = Mamba2Mixer(c.d_model, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand,
                                 headdim=c.headdim, ngroups=c.ngroups, chunk_size=c.chunk_size,
                                 dt_limit=c.dt_limit, layer_idx=layer_idx, norm_eps=c.norm_eps,
                                 conv_bias=c.conv_bias, bias=c.bias, device=device, dtype=dtype)

    def forward(self, hidden, residual, cache=None, **mixer_kwargs):
        """(hidden, residual) -> (mixer output, residual + hidden); residual None for the first block."""
        h, residual = add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, self.residual_in_fp32)
        return self.mixer(h, cache=cache, **mixer_kwargs), residual

    def step(self, hidden, residual, cache):
        h, residual = add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, self.residual_in_fp32)
        return self.mixer.step(h, cache), residual


class Mamba2Backbone(nn.Module):
    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Mamba2Block(config, i, device, dtype) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)

    def forward(self, input_ids=None, inputs_embeds=None, cache=None, mask=None, seq_idx=None,
                cu_seqlens=None):
        """Hidden states after the final norm, (b, l, d_model) in the model dtype."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Mamba2Backbone: pass exactly one of input_ids and inputs_embeds")
        with nvtx("embedding"):
            hidden = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        if hidden.dim() != 3:
            raise ValueError(f"Mamba2Backbone: expected (batch, length) ids or (batch, length, d_model) "
                             f"embeddings, got shape {tuple(hidden.shape)}")
        cont = cache is not None and cache.seqlen_offset > 0
        residual = None
        for i, layer in enumerate(self.layers):
            with nvtx(f"layer{i}"):
                hidden, residual = layer(hidden, residual, cache=None if cache is None else cache[i],
                                         mask=mask, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                         initial_states=cont)
        with nvtx("norm_f"):
            hidden, _ = add_rms_norm(hidden, residual, self.norm_f.weight, self.norm_f.eps)
        if cache is not None:
            cache.seqlen_offset += hidden.shape[1]
        return hidden

    def step(self, hidden, cache):
        """One decode step on embeddings (b, d_model) -> normed hidden (b, d_model)."""
        residual = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer.step(hidden, residual, cache[i])
        hidden, _ = add_rms_norm(hidden, residual, self.norm_f.weight, self.norm_f.eps)
        cache.seqlen_offset += 1
        return hidden


class Mamba2LM(nn.Module):
    """Mamba-2 causal LM. ``model(input_ids)`` -> logits (b, l, padded_vocab) in the model dtype."""

    def __init__(self, config: Mamba2Config, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = Mamba2Backbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """mamba_ssm's initialisation for training from scratch: embeddings N(0, std), linear
        biases zero, out_proj scaled by 1/sqrt(n_layer) (the prenorm-residual rescale).
        (nn.Embedding's default N(0, 1) gives a tied model logits of size sqrt(d_model).)"""
        nn.init.normal_(self.backbone.embedding.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for layer in self.backbone.layers:
            for lin in (layer.mixer.in_proj, layer.mixer.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            layer.mixer.out_proj.weight /= math.sqrt(self.config.n_layer)

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def forward(self, input_ids=None, inputs_embeds=None, cache=None, mask=None, seq_idx=None,
                cu_seqlens=None, num_last_tokens=0):
        """Logits (b, l, padded_vocab) (or for the last `num_last_tokens` positions only).

        cache: an InferenceCache from `allocate_cache`; the final states land in it (prefill) and a
          cache that already holds tokens is continued. mask (b, l) bool: False marks left padding,
          which leaves the states untouched. seq_idx / cu_seqlens: as in ssd_scan.
        """
        hidden = self.backbone(input_ids, inputs_embeds, cache=cache, mask=mask, seq_idx=seq_idx,
                               cu_seqlens=cu_seqlens)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        with nvtx("lm_head"):
            return self.lm_head(hidden)

    def step(self, input_ids, cache):
        """One decode step: input_ids (b,) or (b, 1) -> logits (b, padded_vocab); cache updated in place."""
        ids = input_ids.reshape(-1)
        hidden = self.backbone.step(self.backbone.embedding(ids), cache)
        return decode_linear(hidden, self.lm_head)

    def allocate_cache(self, batch_size, device=None, dtype=None, ssm_dtype=torch.float32):
        """Static decode state for `batch_size` sequences (conv states in the model dtype, ssm states fp32)."""
        states = [layer.mixer.allocate_state(batch_size, device, dtype, ssm_dtype) for layer in self.backbone.layers]
        return InferenceCache(states, batch_size)

    # -- checkpoints ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, config=None):
        """Load a directory in the state-spaces format (config.json + pytorch_model.bin) or the HF
        transformers Mamba2 format (config.json + model.safetensors, sharded or not). dtype None keeps
        the checkpoint's dtype."""
        from .checkpoint import load_lm
        return load_lm(cls, path, device=device, dtype=dtype, config=config)

    def save_pretrained(self, path, max_shard_size=None):
        """Write config.json + model.safetensors in the HF transformers Mamba2 layout."""
        from .checkpoint import save_lm
        save_lm(self, path, max_shard_size=max_shard_size)

    def generate(self, input_ids=None, **kwargs):
        """See mlmamba.generation.generate."""
        from .generation import generate
        return generate(self, input_ids, **kwargs)
