"""The op schemas of csrc/registration.cpp, for installs without the extension.

When mlmamba_kernels._C is built, loading it defines these ops; otherwise `define_all`
defines them from this table, so the op path is the same everywhere.
tests/test_schemas.py checks that this table and registration.cpp agree.
"""
import torch

SCHEMAS = {
    "causal_conv1d_fwd": "causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, "
    "Tensor? initial_states, Tensor? seq_idx, bool silu, bool return_final_states) "
    "-> (Tensor, Tensor)",
    "causal_conv1d_bwd": "causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, "
    "Tensor? initial_states, Tensor? seq_idx, Tensor dout, Tensor? dfinal_states, bool silu) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "causal_conv1d_update": "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, "
    "Tensor weight, Tensor? bias, bool silu) -> Tensor",
    "ssd_scan_fwd": "ssd_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
    "int chunk_size, Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, "
    "Tensor? seq_idx, Tensor? cu_seqlens, bool dt_softplus, float dt_min, float dt_max, "
    "bool return_final_states) -> (Tensor, Tensor)",
    "ssd_scan_bwd": "ssd_scan_bwd(Tensor dout, Tensor? dfinal_states, Tensor x, Tensor dt, "
    "Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, Tensor? z, Tensor? dt_bias, "
    "Tensor? initial_states, Tensor? seq_idx, Tensor? cu_seqlens, bool dt_softplus, "
    "float dt_min, float dt_max, Tensor? chunk_states=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "ssd_state_update": "ssd_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, "
    "Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus) -> Tensor",
    "msc_scan_fwd": "msc_scan_fwd(Tensor xBC, Tensor dt, Tensor A, Tensor D, "
    "Tensor conv_weight, Tensor? conv_bias, Tensor dt_bias, Tensor orders, int headdim, "
    "int ngroups, float dt_min, float dt_max, str merge, bool save_conv=False, "
    "bool save_states=False) -> (Tensor, Tensor, Tensor, Tensor)",
    "msc_scan_bwd": "msc_scan_bwd(Tensor dout, Tensor xBC, Tensor dt, Tensor A, Tensor D, "
    "Tensor conv_weight, Tensor? conv_bias, Tensor dt_bias, Tensor orders, int headdim, "
    "int ngroups, float dt_min, float dt_max, str merge, Tensor? conv_x=None, "
    "Tensor? conv_bc=None, Tensor? states=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "msc_sum_rows": "msc_sum_rows(Tensor[] grads, Tensor inv, float scale=1.0) -> Tensor",
    "msc_gather_rows": "msc_gather_rows(Tensor src, Tensor rows, float scale=1.0) -> Tensor",
    "msc_bwd_saved": "msc_bwd_saved(Tensor dout, Tensor xBC, Tensor dt, Tensor A, Tensor D, "
    "Tensor conv_weight, Tensor? conv_bias, Tensor dt_bias, Tensor rows, Tensor inv, "
    "int headdim, int ngroups, float dt_min, float dt_max, str merge, float dy_scale, "
    "Tensor? conv_x=None, Tensor? conv_bc=None, Tensor? states=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "msc_conv_fwd": "msc_conv_fwd(Tensor xBC, Tensor rows, Tensor weight, Tensor? bias) -> Tensor",
    "msc_conv_bwd": "msc_conv_bwd(Tensor xBC, Tensor rows, Tensor weight, Tensor? bias, "
    "Tensor[] dout) -> (Tensor, Tensor, Tensor)",
}

_lib = None


def define_all():
    """Define every op from SCHEMAS (only when the extension, which defines them, is absent)."""
    global _lib
    _lib = torch.library.Library("mlmamba", "DEF")
    for schema in SCHEMAS.values():
        _lib.define(schema)
