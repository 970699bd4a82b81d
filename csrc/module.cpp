// The Python module mlmamba_kernels._C: loading it registers the ops (registration.cpp and
// each family's ops.cpp); build_info() says how it was built.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#ifndef MLM_CUDA_ARCHS
#define MLM_CUDA_ARCHS ""
#endif
#ifndef MLM_TORCH_VERSION
#define MLM_TORCH_VERSION ""
#endif

PYBIND11_MODULE(_C, m) {
  m.def("build_info", [] {
    pybind11::dict d;
    d["cuda_archs"] = MLM_CUDA_ARCHS;
    d["torch_version"] = MLM_TORCH_VERSION;
    d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                        std::to_string((CUDART_VERSION % 1000) / 10);
    return d;
  });
}
