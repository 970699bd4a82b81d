// Host glue of msc_sum_rows (sum_rows.cu): the msc_scan backward's sum of the per-scan
// gradients through the inverse orders. Schema: csrc/registration.cpp; reference:
// mlmamba_kernels/msc.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common/check.h"
#include "msc/msc.h"
#include "ssd/host.h"

namespace mlmamba {
namespace msc {
namespace {

at::Tensor msc_sum_rows_cuda(at::TensorList grads, const at::Tensor& inv, double scale) {
  const char* op = "msc_sum_rows";
  const int64_t k = static_cast<int64_t>(grads.size());
  MLM_CHECK(k >= 1 && k <= kMaxSumScans, op, ": grads must hold 1 to ", kMaxSumScans,
            " tensors, got ", k);
  const at::Tensor& g0 = grads[0];
  MLM_CHECK(g0.is_cuda() && g0.dim() == 3, op,
            ": grads[0] must be a 3-dim (batch, seqlen, cols) CUDA tensor, got ", g0.sizes(),
            " on ", g0.device());
  const at::ScalarType dt = g0.scalar_type();
  MLM_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
            ": grads must be float32, float16 or bfloat16, got ", dt);
  const int64_t b = g0.size(0), L = g0.size(1), c = g0.size(2);
  std::vector<at::Tensor> src;
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& g = grads[i];
    MLM_CHECK(g.device() == g0.device() && g.scalar_type() == dt &&
                  g.sizes() == g0.sizes(),
              op, ": grads[", i, "] must match grads[0] (", g0.scalar_type(), " ", g0.sizes(),
              " on ", g0.device(), "), got ", g.scalar_type(), " ", g.sizes(), " on ",
              g.device());
    src.push_back(g.stride(2) == 1 ? g : g.contiguous());
  }
  MLM_CHECK(inv.device() == g0.device() && inv.scalar_type() == at::kInt &&
                inv.sizes() == at::IntArrayRef({k, L}) && inv.is_contiguous(),
            op, ": inv must be a contiguous int32 tensor of shape (", k, ", ", L, ") on ",
            g0.device(), ", got ", inv.scalar_type(), " ", inv.sizes(), " on ", inv.device());
  MLM_CHECK(L < (int64_t{1} << 31), op, ": seqlen must be below 2^31, got ", L);

  c10::cuda::CUDAGuard guard(g0.device());
  at::Tensor out = at::empty({b, L, c}, g0.options());
  if (out.numel() == 0) return out;
  SumRowsParams p{};
  const int64_t es = g0.element_size(), V = 16 / es;
  bool wide = c % V == 0;
  for (int64_t i = 0; i < k; ++i) {
    p.src[i] = src[i].data_ptr();
    p.src_b[i] = src[i].stride(0);
    p.src_l[i] = src[i].stride(1);
    wide = wide && p.src_b[i] % V == 0 && p.src_l[i] % V == 0 &&
           reinterpret_cast<uintptr_t>(p.src[i]) % 16 == 0;
  }
  p.inv = inv.data_ptr<int>();
  p.out = out.data_ptr();
  p.out_b = out.stride(0);
  p.out_l = out.stride(1);
  p.batch = b;
  p.seqlen = L;
  p.cols = c;
  p.nscans = static_cast<int>(k);
  p.scale = static_cast<float>(scale);
  const int dtype = ssd::dtype_code(dt);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  launch_sum_rows(p, dtype, wide, sms, at::cuda::getCurrentCUDAStream());
  MLM_CHECK_LAUNCH();
  return out;
}

}  // namespace
}  // namespace msc
}  // namespace mlmamba

TORCH_LIBRARY_IMPL(mlmamba, CUDA, m) { m.impl("msc_sum_rows", &mlmamba::msc::msc_sum_rows_cuda); }
