"""Connectors from vision features to LM embeddings, selectable by name (formats.md §1.3-1.5, §4).

  "mlp"      Cobra: FusedMLPProjector(vision_dim -> 4x -> d_model -> d_model).
  "msc-bsm"  ML-Mamba: Linear+GELU to d_model, blocks of [MSC mixer scanning forward and backward]
             (+ [LayerNorm -> SwiGLU] in the advanced variant), final LayerNorm, then
             FusedMLPProjector(d_model -> 4x -> d_model -> d_model).
  "msc-csm"  the same with the 2D cross scan (row-major, column-major, both reversed) or any
             list of scan orders.

The MSC mixer is the official bidirectional Mamba-2 mixer generalised to k scan orders: one
shared in_proj, per-order conv1d / dt_bias / A_log / D (stored stacked, first dim k), each
order's output normalised by the shared gated RMSNorm, the k results averaged, then out_proj.
All k scans go through one `msc_scan` call. Official checkpoints use per-direction names
(conv1d / conv1d_b, ...); `official_to_connector_keys` converts them.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F

from mlmamba_kernels import msc_scan, scan_orders

from .mixer import split_zxbcdt
from .norm import RMSNormGated

__all__ = ["CONNECTORS", "FusedMLPProjector", "SwiGLU", "MSCMixer", "MSCBlock", "MLPConnector",
           "MSCConnector", "build_connector", "resolve_orders"]

CONNECTORS = ("mlp", "msc-bsm", "msc-csm")
ORDER_NAMES = {"msc-bsm": "bidirectional", "msc-csm": "cross"}


class FusedMLPProjector(nn.Sequential):
    """Linear(in, 4*in) -> GELU -> Linear(4*in, out) -> GELU -> Linear(out, out); keys 0, 2, 4."""

    def __init__(self, in_dim, out_dim, device=None, dtype=None):
        kw = {"device": device, "dtype": dtype}
        super().__init__(nn.Linear(in_dim, 4 * in_dim, **kw), nn.GELU(),
                         nn.Linear(4 * in_dim, out_dim, **kw), nn.GELU(),
                         nn.Linear(out_dim, out_dim, **kw))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), all with bias (the official connector's MLP)."""

    def __init__(self, dim, hidden, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Linear(dim, hidden, **kw)
        self.w2 = nn.Linear(dim, hidden, **kw)
        self.w3 = nn.Linear(hidden, dim, **kw)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def resolve_orders(spec, grid):
    """Scan orders (k, H*W) int64 on the CPU (even while building on meta) from a scan_orders
    spec: "bidirectional", "cross", or a list of order names / raster-index permutations."""
    with torch.device("cpu"):
        return scan_orders(grid[0], grid[1], list(spec) if isinstance(spec, tuple) else spec)


class MSCMixer(nn.Module):
    """Mamba-2 mixer scanning the token grid in k orders (see module docstring).

    forward(u (b, L, d_model), orders (k, L)) -> (b, L, d_model).
    """

    def __init__(self, d_model, num_orders, d_state=128, d_conv=4, expand=2, headdim=64,
                 ngroups=1, dt_limit=(0.0, float("inf")), norm_eps=1e-5, dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1, 16), device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        k = num_orders
        self.d_model, self.num_orders, self.d_state, self.d_conv = d_model, k, d_state, d_conv
        self.headdim, self.ngroups = headdim, ngroups
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"MSCMixer: d_inner {self.d_inner} is not a multiple of headdim {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"MSCMixer: ngroups {ngroups} does not divide nheads {self.nheads}")
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.dt_limit = tuple(float(v) for v in dt_limit)
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False, **kw)
        self.conv_weight = nn.Parameter(torch.empty(k, self.conv_dim, d_conv, **kw))
        self.conv_bias = nn.Parameter(torch.empty(k, self.conv_dim, **kw))
        self.dt_bias = nn.Parameter(torch.empty(k, self.nheads, **kw))
        self.A_log = nn.Parameter(torch.empty(k, self.nheads, **kw))
        self.D = nn.Parameter(torch.empty(k, self.nheads, **kw))
        self.norm = RMSNormGated(self.d_inner, eps=norm_eps, group_size=self.d_inner // ngroups, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **kw)
        self._init(dt_min, dt_max, dt_init_floor, A_init_range)

    @torch.no_grad()
    def _init(self, dt_min, dt_max, dt_init_floor, A_init_range):
        if self.D.is_meta:
            return
        bound = 1 / math.sqrt(self.d_conv)  # nn.Conv1d's default for a depthwise conv
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.uniform_(-bound, bound)
        shape = self.dt_bias.shape
        u = torch.rand(shape, device=self.D.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log.copy_(torch.empty(shape, device=self.D.device).uniform_(*A_init_range).log())
        self.D.fill_(1.0)

    def extra_repr(self):
        return (f"d_model={self.d_model}, orders={self.num_orders}, d_state={self.d_state}, "
                f"nheads={self.nheads}, headdim={self.headdim}, ngroups={self.ngroups}")

    def forward(self, u, orders):
        if orders.shape != (self.num_orders, u.shape[1]):
            raise ValueError(f"MSCMixer: orders has shape {tuple(orders.shape)}, expected "
                             f"({self.num_orders}, {u.shape[1]})")
        z, xBC, dt = split_zxbcdt(self.in_proj(u), self.d_inner, self.ngroups, self.d_state,
                                  self.nheads)
        A = -torch.exp(self.A_log if self.A_log.dtype == torch.float64 else self.A_log.float())
        y = msc_scan(xBC, dt, A, self.D, self.conv_weight, self.conv_bias, self.dt_bias,
                     orders.to(u.device), self.headdim, self.ngroups, dt_limit=self.dt_limit,
                     merge=None)  # (k, b, L, h, p): each order is normalised before the mean
        y = y.flatten(-2)
        return self.out_proj(self.norm(y, z.expand_as(y)).mean(0))


class MSCBlock(nn.Module):
    """h + mixer(h) (no pre-norm); then h + SwiGLU(LayerNorm(h)) when `swiglu`."""

    def __init__(self, d_model, num_orders, swiglu=True, mixer_kwargs=None, device=None,
                 dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.mixer = MSCMixer(d_model, num_orders, **(mixer_kwargs or {}), **kw)
        if swiglu:
            self.norm = nn.LayerNorm(d_model, eps=1e-5, **kw)
            self.mlp = SwiGLU(d_model, d_model, **kw)
        else:
            self.norm = self.mlp = None

    def forward(self, h, orders):
        h = h + self.mixer(h, orders)
        if self.mlp is not None:
            h = h + self.mlp(self.norm(h))
        return h


class MLPConnector(nn.Module):
    """Cobra's connector: the fused GELU MLP projector straight from vision features."""

    def __init__(self, vision_dim, d_model, device=None, dtype=None):
        super().__init__()
        self.projector = FusedMLPProjector(vision_dim, d_model, device=device, dtype=dtype)

    def forward(self, feats):
        return self.projector(feats)


class MSCConnector(nn.Module):
    """ML-Mamba's connector: mlp -> MSC blocks -> norm_f -> projector."""

    def __init__(self, vision_dim, d_model, grid, orders="bidirectional", n_layers=2,
                 swiglu=True, mixer_kwargs=None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.grid = tuple(grid)
        self.register_buffer("orders", resolve_orders(orders, self.grid), persistent=False)
        self._orders_on = None  # (source buffer, its version, copy on the input's device)
        k = self.orders.shape[0]
        self.mlp = nn.Sequential(nn.Linear(vision_dim, d_model, **kw), nn.GELU())
        self.layers = nn.ModuleList(
            MSCBlock(d_model, k, swiglu, mixer_kwargs, **kw) for _ in range(n_layers))
        self.norm_f = nn.LayerNorm(d_model, eps=1e-5, **kw)
        self.projector = FusedMLPProjector(d_model, d_model, **kw)

    def forward(self, feats):
        L = feats.shape[1]
        if L != self.orders.shape[1]:
            raise ValueError(f"MSCConnector: got {L} visual tokens, expected "
                             f"{self.orders.shape[1]} ({self.grid[0]}x{self.grid[1]} grid)")
        h = self.mlp(feats)
        orders = self.orders_on(feats.device)
        for layer in self.layers:
            h = layer(h, orders)
        return self.projector(self.norm_f(h))

    def orders_on(self, device):
        """The orders on `device`, copied once and kept (remade when the buffer is edited or
        replaced). The copy is made outside inference mode, so it has a version counter and
        msc_scan's check of its values (one host sync) runs once, not on every call."""
        o = self.orders
        if o.device == device:
            return o
        version = None if o.is_inference() else o._version
        c = self._orders_on
        if c is None or c[0] is not o or c[1] != version or c[2].device != device:
            with torch.inference_mode(False):
                c = (o, version, o.to(device))
            self._orders_on = c
        return c[2]


def build_connector(kind, vision_dim, d_model, grid, scan_orders=None, n_layers=2, swiglu=True,
                    mixer_kwargs=None, device=None, dtype=None):
    """A connector by name; scan_orders (a name or list of permutations) overrides the kind's."""
    if kind == "mlp":
        return MLPConnector(vision_dim, d_model, device=device, dtype=dtype)
    if kind in ORDER_NAMES:
        orders = ORDER_NAMES[kind] if scan_orders is None else scan_orders
        return MSCConnector(vision_dim, d_model, grid, orders, n_layers, swiglu, mixer_kwargs,
                            device=device, dtype=dtype)
    raise ValueError(f"connector {kind!r}: expected one of {CONNECTORS}")


# -- official ML-Mamba / Cobra key names ------------------------------------------------------
_STACKED = {"conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias", "dt_bias": "dt_bias",
            "A_log": "A_log", "D": "D"}
_BACKWARD = {"conv1d_b.weight": "conv1d.weight", "conv1d_b.bias": "conv1d.bias",
             "dt_bias_b": "dt_bias", "A_log_b": "A_log", "D_b": "D"}


def official_to_connector_keys(mlp, bidirectional_mamba, projector):
    """ML-Mamba's three connector sub-dicts -> an MSCConnector state dict (2 orders, stacked).

    Per-direction tensors (conv1d / conv1d_b, dt_bias / dt_bias_b, ...) are stacked forward
    first; conv1d weights (C, 1, w) become (C, w).
    Keys that are not recognised pass through unchanged, so the strict load names them.
    """
    out = {f"mlp.{k}": v for k, v in mlp.items()}
    out.update({f"projector.{k}": v for k, v in projector.items()})
    pending = {}
    for key, v in bidirectional_mamba.items():
        head, sep, tail = key.partition(".mixer.")
        if not sep:
            out[key] = v
            continue
        if tail in _STACKED or tail in _BACKWARD:
            direction = 1 if tail in _BACKWARD else 0
            name = _STACKED[_BACKWARD.get(tail, tail)]
            if name == "conv_weight" and v.dim() == 3:
                v = v.squeeze(1)
            pending.setdefault(f"{head}.mixer.{name}", {})[direction] = (key, v)
        else:
            out[key] = v
    for name, parts in pending.items():
        if set(parts) != {0, 1}:
            have = parts.get(0, parts.get(1))[0]
            raise KeyError(f"bidirectional_mamba: {have} has no matching "
                           f"{'backward' if 0 in parts else 'forward'}-direction key")
        out[name] = torch.stack([parts[0][1], parts[1][1]])
    return out


def connector_to_official_keys(state):
    """Inverse of official_to_connector_keys for a 2-order MSCConnector state dict:
    returns the dicts (mlp, bidirectional_mamba, projector) with official names and shapes."""
    mlp, bim, proj = {}, {}, {}
    fwd_name = {v: k for k, v in _STACKED.items()}
    bwd_name = {f: b for b, f in _BACKWARD.items()}
    for key, v in state.items():
        head, sep, tail = key.partition(".mixer.")
        if key.startswith("mlp."):
            mlp[key[4:]] = v
        elif key.startswith("projector."):
            proj[key[10:]] = v
        elif sep and tail in fwd_name:
            if v.shape[0] != 2:
                raise ValueError(f"{key}: the official format holds 2 scan orders, got {v.shape[0]}")
            f_t, b_t = (v[0].unsqueeze(1), v[1].unsqueeze(1)) if tail == "conv_weight" else (v[0], v[1])
            bim[f"{head}.mixer.{fwd_name[tail]}"] = f_t
            bim[f"{head}.mixer.{bwd_name[fwd_name[tail]]}"] = b_t
        else:
            bim[key] = v
    return mlp, bim, proj
