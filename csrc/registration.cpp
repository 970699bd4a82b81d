// Every op schema of the library, in one place. Implementations register elsewhere:
// CUDA kernels in each family's ops.cpp (TORCH_LIBRARY_IMPL(mlmamba, CUDA, m)),
// the PyTorch references from Python (mlmamba_kernels/_registry.py).
// mlmamba_kernels/_schemas.py mirrors these strings for installs without _C;
// tests/test_schemas.py keeps the two equal.
#include <torch/library.h>

TORCH_LIBRARY(mlmamba, m) {
  // causal conv1d
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, "
        "Tensor? seq_idx, bool silu, bool return_final_states) -> (Tensor, Tensor)");
  m.def("causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, "
        "Tensor? seq_idx, Tensor dout, Tensor? dfinal_states, bool silu) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
        "bool silu) -> Tensor");
  // SSD chunked scan
  m.def("ssd_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, "
        "Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, Tensor? seq_idx, "
        "Tensor? cu_seqlens, bool dt_softplus, float dt_min, float dt_max, "
        "bool return_final_states) -> (Tensor, Tensor)");
  m.def("ssd_scan_bwd(Tensor dout, Tensor? dfinal_states, Tensor x, Tensor dt, Tensor A, "
        "Tensor B, Tensor C, int chunk_size, Tensor? D, Tensor? z, Tensor? dt_bias, "
        "Tensor? initial_states, Tensor? seq_idx, Tensor? cu_seqlens, bool dt_softplus, "
        "float dt_min, float dt_max, Tensor? chunk_states=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ssd_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus) -> Tensor");
  // multi-order 2D scan
  m.def("msc_scan_fwd(Tensor xBC, Tensor dt, Tensor A, Tensor D, Tensor conv_weight, "
        "Tensor? conv_bias, Tensor dt_bias, Tensor orders, int headdim, int ngroups, "
        "float dt_min, float dt_max, str merge, bool save_conv=False, "
        "bool save_states=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("msc_scan_bwd(Tensor dout, Tensor xBC, Tensor dt, Tensor A, Tensor D, "
        "Tensor conv_weight, Tensor? conv_bias, Tensor dt_bias, Tensor orders, int headdim, "
        "int ngroups, float dt_min, float dt_max, str merge, Tensor? conv_x=None, "
        "Tensor? conv_bc=None, Tensor? states=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("msc_sum_rows(Tensor[] grads, Tensor inv, float scale=1.0) -> Tensor");
  m.def("msc_gather_rows(Tensor src, Tensor rows, float scale=1.0) -> Tensor");
  m.def("msc_bwd_saved(Tensor dout, Tensor xBC, Tensor dt, Tensor A, Tensor D, "
        "Tensor conv_weight, Tensor? conv_bias, Tensor dt_bias, Tensor rows, Tensor inv, "
        "int headdim, int ngroups, float dt_min, float dt_max, str merge, float dy_scale, "
        "Tensor? conv_x=None, Tensor? conv_bc=None, Tensor? states=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("msc_conv_fwd(Tensor xBC, Tensor rows, Tensor weight, Tensor? bias) -> Tensor");
  m.def("msc_conv_bwd(Tensor xBC, Tensor rows, Tensor weight, Tensor? bias, Tensor[] dout) "
        "-> (Tensor, Tensor, Tensor)");
}
