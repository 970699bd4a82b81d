"""Reference causal depthwise conv1d (the truth for the CUDA kernels and their CPU implementation).

out[b, c, t] = act(bias[c] + sum_k weight[c, k] * xpad[b, c, t + k]),  k = 0 .. w-1,
where xpad is x with its w-1 previous inputs in front (initial_states, else zeros):
weight[:, -1] multiplies the current input, weight[:, 0] the oldest one.
Inputs are assumed validated by the caller (mlmamba_kernels); everything is differentiable.
"""
import torch
import torch.nn.functional as F


def compute_dtype(*tensors):
    """float64 if any of the tensors is float64, else float32: the dtype the references compute in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def segment_ids(seq_idx):
    """(b, l) int64 ids that start at 0 and grow by one wherever seq_idx changes along l.

    A segment is a run of equal seq_idx values; the ids are monotone even if seq_idx is not."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return F.pad(change.cumsum(1), (1, 0))[:, :seq_idx.shape[1]]


def conv_out_like(x):
    """Empty output for x (b, d, l) in x's layout: channel-last if x.stride(1) == 1 and d > 1."""
    b, d, l = x.shape
    if x.stride(1) == 1 and d > 1:
        return x.new_empty(b, l, d).transpose(1, 2)
    return x.new_empty(b, d, l)


def _apply(act, y):
    if act is None:
        return y
    if act in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {act!r}")


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None,
                  return_final_states=False, seq_idx=None):
    """x (b, d, l) any strides; weight (d, w); bias (d,); initial_states (b, d, w-1); seq_idx (b, l).

    With seq_idx, the output at t sees only inputs of its own segment (no seq_idx change between),
    and initial_states feed only the first segment. Returns out (x's dtype and layout) or
    (out, final_states) with final_states (b, d, w-1): the last w-1 inputs, x's dtype, contiguous.
    """
    b, d, l = x.shape
    w = weight.shape[1]
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    if initial_states is None:
        prev = xf.new_zeros(b, d, w - 1)
    else:
        prev = initial_states.to(cdt)
    xp = torch.cat([prev, xf], dim=2)                        # (b, d, w-1+l)
    wf = weight.to(cdt)
    if seq_idx is not None:
        seg = segment_ids(seq_idx)
        # positions before the sequence (initial states) belong to the first segment (id 0)
        segp = torch.cat([seg.new_zeros(b, w - 1), seg], dim=1)
    y = None
    for k in range(w):
        term = wf[:, k, None] * xp[:, :, k:k + l]
        if seq_idx is not None:
            term = torch.where(segp[:, None, k:k + l] == seg[:, None, :], term, 0.0)
        y = term if y is None else y + term
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    y = _apply(activation, y)
    out = conv_out_like(x)
    out.copy_(y)
    if not return_final_states:
        return out
    prev_x = x.new_zeros(b, d, w - 1) if initial_states is None else initial_states.to(x.dtype)
    final = torch.cat([prev_x, x], dim=2)[:, :, l:].contiguous()
    return out, final


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Decode: x (b, d) or (b, d, l); conv_state (b, d, s) with s >= w-1 holds the last s inputs
    (oldest first) and is shifted in place by l. Returns out with x's shape and dtype."""
    squeeze = x.dim() == 2
    xs = x.unsqueeze(2) if squeeze else x
    l = xs.shape[2]
    w = weight.shape[1]
    s = conv_state.shape[2]
    cdt = compute_dtype(x, conv_state)
    full = torch.cat([conv_state.to(cdt), xs.to(cdt)], dim=2)  # (b, d, s+l)
    win = full[:, :, s - (w - 1):]                              # (b, d, w-1+l)
    wf = weight.to(cdt)
    y = sum(wf[:, k, None] * win[:, :, k:k + l] for k in range(w))
    if bias is not None:
        y = y + bias.to(cdt)[:, None]
    y = _apply(activation, y)
    conv_state.copy_(full[:, :, l:])
    y = y.to(x.dtype)
    return y.squeeze(2) if squeeze else y
