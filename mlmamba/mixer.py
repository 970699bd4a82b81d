"""The Mamba-2 mixer (mamba_ssm's ``Mamba2`` with parameter names kept, so checkpoints load as is).

    u -> in_proj -> [z | xBC | dt]
    xBC -> causal_conv1d(silu) -> [x | B | C]
    y = ssd_scan(x, dt, A, B, C, D, dt_bias, softplus, dt_limit)
    out = out_proj(rmsnorm(y * silu(z)) per group of d_inner / ngroups channels)

Decoding one token is `causal_conv1d_update` + `ssd_state_update` on a `MixerState`
(conv_state, ssm_state), updated in place: constant memory.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from mlmamba_kernels import causal_conv1d, causal_conv1d_update, ssd_scan, ssd_state_update

from .norm import RMSNormGated

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

__all__ = ["Mamba2Mixer", "MixerState", "split_zxbcdt", "split_xbc", "conv_states_at_ends", "decode_linear"]

NO_LIMIT = (0.0, float("inf"))


@dataclass
class MixerState:
    """One layer's decode state. conv_state (b, conv_dim, d_conv-1) in the model dtype holds the last
    d_conv-1 conv inputs; ssm_state (b, nheads, headdim, d_state) float32."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor

    def zero_(self):
        self.conv_state.zero_()
        self.ssm_state.zero_()
        return self


def split_zxbcdt(zxbcdt, d_inner, ngroups, d_state, nheads):
    """Split in_proj output (..., 2*d_inner + 2*ngroups*d_state + nheads) into views z, xBC, dt."""
    conv_dim = d_inner + 2 * ngroups * d_state
    expected = d_inner + conv_dim + nheads
    if zxbcdt.shape[-1] != expected:
        raise ValueError(f"split_zxbcdt: last dim is {zxbcdt.shape[-1]}, expected {expected} "
                         f"(2*d_inner + 2*ngroups*d_state + nheads)")
    return torch.split(zxbcdt, [d_inner, conv_dim, nheads], dim=-1)


def split_xbc(xBC, d_inner, ngroups, d_state):
    """Split conv output (..., d_inner + 2*ngroups*d_state) into views x, B, C (flat last dim)."""
    return torch.split(xBC, [d_inner, ngroups * d_state, ngroups * d_state], dim=-1)


def conv_states_at_ends(xBC, cu_seqlens, width):
    """Conv states after each packed sequence: the last `width` inputs of each, zeros where the
    sequence is shorter. xBC (1, l, d); cu_seqlens (nseq+1,) -> (nseq, d, width)."""
    ends = cu_seqlens[1:].long()
    starts = cu_seqlens[:-1].long()
    pos = ends[:, None] - width + torch.arange(width, device=xBC.device)  # (nseq, width)
    valid = pos >= starts[:, None]
    picked = xBC[0].index_select(0, pos.clamp(min=0).flatten()).view(len(ends), width, -1)
    picked = picked * valid[..., None].to(picked.dtype)
    return picked.transpose(1, 2).contiguous()


class Mamba2Mixer(nn.Module):
    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
                 chunk_size=256, dt_limit=NO_LIMIT, layer_idx=None, norm_eps=1e-5,
                 conv_bias=True, bias=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 A_init_range=(1, 16), device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.headdim = headdim
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        self.dt_limit = tuple(float(v) for v in dt_limit)
        self.layer_idx = layer_idx
        self.d_inner = expand * d_model
        if self.d_inner % headdim != 0:
            raise ValueError(f"Mamba2Mixer: d_inner {self.d_inner} (expand*d_model) is not a multiple of headdim {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups != 0:
            raise ValueError(f"Mamba2Mixer: ngroups {ngroups} does not divide nheads {self.nheads}")
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **kw)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **kw)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **kw))
        self.A_log = nn.Parameter(torch.empty(self.nheads, **kw))
        self.D = nn.Parameter(torch.empty(self.nheads, **kw))
        self.norm = RMSNormGated(self.d_inner, eps=norm_eps, group_size=self.d_inner // ngroups, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)
        self._init_ssm(dt_min, dt_max, dt_init_floor, A_init_range)

    @torch.no_grad()
    def _init_ssm(self, dt_min, dt_max, dt_init_floor, A_init_range):
        # mamba_ssm's init: dt log-uniform in [dt_min, dt_max], dt_bias = softplus^-1(dt); A ~ U(A_init_range)
        if self.dt_bias.is_meta:
            return
        dev = self.dt_bias.device
        u = torch.rand(self.nheads, device=dev, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads, device=dev, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    def extra_repr(self):
        return (f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, d_conv={self.d_conv}, chunk_size={self.chunk_size}")

    # -- state ----------------------------------------------------------------------------------
    def allocate_state(self, batch_size, device=None, dtype=None, ssm_dtype=torch.float32):
        w = self.in_proj.weight
        device = w.device if device is None else device
        dtype = w.dtype if dtype is None else dtype
        return MixerState(
            torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype))

    def _A(self):
        return -torch.exp(self.A_log.float())

    def _decode_params(self):
        """fp32 (A, D, dt_bias) for decode steps, computed once per parameter version: saves the
        conversion kernels a bf16 model would otherwise run in every layer at every step."""
        params = (self.A_log, self.D, self.dt_bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._A(), self.D, self.dt_bias
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params) + (torch.is_inference_mode_enabled(),)
        if getattr(self, "_decode_key", None) != key:
            self._decode_buf = (self._A(), self.D.float(), self.dt_bias.float())
            self._decode_key = key
        return self._decode_buf

    def _conv_weight(self):
        return self.conv1d.weight.view(self.conv_dim, self.d_conv)

    # -- full sequence --------------------------------------------------------------------------
    def forward(self, u, cache=None, seq_idx=None, cu_seqlens=None, mask=None, initial_states=False):
        """u (b, l, d_model) -> (b, l, d_model).

        cache: a MixerState; its final conv and ssm states are written into it in place (prefill).
          With initial_states=True the cache's current states are the starting point (chunked
          prefill / continuing a sequence); otherwise the sequence starts from zero states.
        seq_idx (b, l) int32: states reset where it changes. cu_seqlens (nseq+1,) int32 with b == 1:
          packed sequences; with a cache, the cache has one row per sequence.
        mask (b, l) bool, True for real tokens: positions where it is False (left padding) are exact
          no-ops for the state (their conv inputs and x are zeroed), as if the prompt were alone.
        """
        b, l, _ = u.shape
        zxbcdt = self.in_proj(u)
        z, xBC, dt = split_zxbcdt(zxbcdt, self.d_inner, self.ngroups, self.d_state, self.nheads)
        if mask is not None:
            keep = mask[..., None].to(xBC.dtype)
            xBC = xBC * keep
        conv_seq_idx = seq_idx
        if cu_seqlens is not None:
            if b != 1:
                raise ValueError(f"Mamba2Mixer: cu_seqlens needs batch 1, got batch {b}")
            conv_seq_idx = _seq_idx_from_cu(cu_seqlens, l)
        want_states = cache is not None
        conv_init = cache.conv_state if (want_states and initial_states) else None
        ssm_init = cache.ssm_state if (want_states and initial_states) else None
        if conv_init is not None and cu_seqlens is not None:
            raise ValueError("Mamba2Mixer: initial_states with cu_seqlens is not supported")

        conv_out = causal_conv1d(xBC.transpose(1, 2), self._conv_weight(), self.conv1d.bias,
                                 activation="silu", initial_states=conv_init,
                                 return_final_states=want_states and cu_seqlens is None,
                                 seq_idx=conv_seq_idx)
        if isinstance(conv_out, tuple):
            conv_out, conv_final = conv_out
        else:
            conv_final = None
        xBC_act = conv_out.transpose(1, 2)
        x, B, C = split_xbc(xBC_act, self.d_inner, self.ngroups, self.d_state)
        if mask is not None:
            x = x * keep
        res = ssd_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt, self._A(),
                       B.unflatten(-1, (self.ngroups, self.d_state)),
                       C.unflatten(-1, (self.ngroups, self.d_state)),
                       chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                       initial_states=ssm_init, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                       dt_softplus=True, dt_limit=self.dt_limit, return_final_states=want_states)
        if want_states:
            y, ssm_final = res
            if cu_seqlens is not None:
                conv_final = conv_states_at_ends(xBC, cu_seqlens, self.d_conv - 1)
            cache.conv_state.copy_(conv_final)
            cache.ssm_state.copy_(ssm_final)
        else:
            y = res
        y = self.norm(y.flatten(-2), z)
        return self.out_proj(y)

    # -- one decode step ------------------------------------------------------------------------
    def step(self, u, cache):
        """One token: u (b, d_model) or (b, 1, d_model); cache (MixerState) updated in place."""
        squeeze = u.dim() == 3
        if squeeze:
            if u.shape[1] != 1:
                raise ValueError(f"Mamba2Mixer.step: expected one token, got u of shape {tuple(u.shape)}")
            u = u[:, 0]
        b = u.shape[0]
        zxbcdt = decode_linear(u, self.in_proj)
        z, xBC, dt = split_zxbcdt(zxbcdt, self.d_inner, self.ngroups, self.d_state, self.nheads)
        xBC = causal_conv1d_update(xBC, cache.conv_state, self._conv_weight(), self.conv1d.bias,
                                   activation="silu")
        x, B, C = split_xbc(xBC, self.d_inner, self.ngroups, self.d_state)
        A, D, dt_bias = self._decode_params()
        y = ssd_state_update(cache.ssm_state, x.view(b, self.nheads, self.headdim), dt, A,
                             B.view(b, self.ngroups, self.d_state), C.view(b, self.ngroups, self.d_state),
                             D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=self.dt_limit)
        out = decode_linear(self.norm(y.reshape(b, self.d_inner), z), self.out_proj)
        return out[:, None] if squeeze else out


def _seq_idx_from_cu(cu_seqlens, length):
    pos = torch.arange(length, device=cu_seqlens.device)
    idx = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)
    return idx.to(torch.int32)[None]


# -- one-row GEMV for batch-1 decode ---------------------------------------------------------------
# At batch 1 a decode step is a chain of matrix-vector products that must stream every weight
# once; this Triton GEMV streams them faster than cuBLAS's GEMM kernels at M = 1 (measured on an
# H100: in_proj 2560->10576 20.1 vs 21.7 us, out_proj 5120->2560 11.5 vs 13.2 us, lm_head 84 vs 95 us).
# No atomics: deterministic, so a CUDA graph and eager give the same tokens.
def decode_linear(x, linear):
    """linear(x) for decode; a Triton GEMV when x is one bf16/fp16 row on CUDA (inference)."""
    w = linear.weight
    if (triton is None or not x.is_cuda or x.dim() != 2 or x.shape[0] != 1 or x.dtype != w.dtype
            or x.dtype not in (torch.bfloat16, torch.float16) or w.stride(1) != 1
            or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
        return linear(x)
    n, k = w.shape
    y = torch.empty(1, n, device=x.device, dtype=x.dtype)
    wide = k >= 4096 or n >= 32768
    bias = linear.bias
    _gemv_kernel[(triton.cdiv(n, 4 if wide else 8),)](
        x, w, bias if bias is not None else y, y, n, k, w.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=4 if wide else 8, BLOCK_K=512, num_warps=8 if k >= 4096 else 4, num_stages=3)
    return y


if triton is not None:
    @triton.jit
    def _gemv_kernel(X, W, Bias, Y, N, K, sw, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        wp = W + rows.to(tl.int64)[:, None] * sw
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            w = tl.load(wp + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0,
                        eviction_policy="evict_first")
            xv = tl.load(X + ks, mask=kmask, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:  # in fp32, before the one rounding (as cuBLAS's epilogue does)
            y += tl.load(Bias + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rmask)
