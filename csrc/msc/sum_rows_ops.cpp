// Host glue of msc_sum_rows and msc_gather_rows (sum_rows.cu): the msc_scan backward's sum of
// the per-scan gradients through the inverse orders, and its gather of dout and dt into scan
// order for all scans at once. Schemas: csrc/registration.cpp; references:
// mlmamba_kernels/msc.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
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

// out (b, L, k, cols) with out[:, t, i] = src_i[:, rows[i, t]] * scale (fp32, one rounding;
// zeros where rows holds a position outside range(L)); src (b, L, cols) is every scan's
// source, or (k, b, L, cols) one per scan
at::Tensor msc_gather_rows_cuda(const at::Tensor& src_in, const at::Tensor& rows, double scale) {
  const char* op = "msc_gather_rows";
  MLM_CHECK(src_in.is_cuda() && (src_in.dim() == 3 || src_in.dim() == 4), op,
            ": src must be a (batch, seqlen, cols) or (k, batch, seqlen, cols) CUDA tensor, got ",
            src_in.sizes(), " on ", src_in.device());
  const at::ScalarType dt = src_in.scalar_type();
  MLM_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
            ": src must be float32, float16 or bfloat16, got ", dt);
  MLM_CHECK(rows.dim() == 2 && rows.device() == src_in.device() &&
                rows.scalar_type() == at::kInt && rows.is_contiguous(),
            op, ": rows must be a contiguous 2-dim (k, seqlen) int32 tensor on ", src_in.device(),
            ", got ", rows.scalar_type(), " ", rows.sizes(), " on ", rows.device());
  const bool per_scan = src_in.dim() == 4;
  const int64_t k = rows.size(0), L = rows.size(1);
  const at::Tensor src4 = per_scan ? src_in : src_in.unsqueeze(0);
  const int64_t b = src4.size(1), c = src4.size(3);
  MLM_CHECK(src4.size(2) == L && (!per_scan || src4.size(0) == k), op, ": src must have shape (",
            per_scan ? std::to_string(k) + ", " : std::string(), "batch, ", L,
            ", cols) for rows of shape (", k, ", ", L, "), got ", src_in.sizes());
  MLM_CHECK(k >= 1 && k <= 65535, op, ": rows must hold 1 to 65535 scans, got ", k);
  MLM_CHECK(L < (int64_t{1} << 31), op, ": seqlen must be below 2^31, got ", L);
  const at::Tensor src = src4.stride(3) == 1 ? src4 : src4.contiguous();

  c10::cuda::CUDAGuard guard(src.device());
  at::Tensor out = at::empty({b, L, k, c}, src.options());
  if (out.numel() == 0) return out;
  SumRowsParams p{};
  const int64_t V = 16 / src.element_size();
  p.src[0] = src.data_ptr();
  p.src_b[0] = src.stride(1);
  p.src_l[0] = src.stride(2);
  p.src_s = per_scan ? src.stride(0) : 0;
  p.inv = rows.data_ptr<int>();
  p.out = out.data_ptr();
  p.out_b = out.stride(0);
  p.out_l = out.stride(1);
  p.out_s = out.stride(2);
  p.batch = b;
  p.seqlen = L;
  p.cols = c;
  p.nscans = 1;
  p.ngather = static_cast<int>(k);
  p.scale = static_cast<float>(scale);
  const bool wide = c % V == 0 && p.src_b[0] % V == 0 && p.src_l[0] % V == 0 &&
                    p.src_s % V == 0 && reinterpret_cast<uintptr_t>(p.src[0]) % 16 == 0;
  // a source shared by several scans, rows of 1 KB or more: read once by source row (rows
  // inverted on the device; short rows, e.g. dt's, gather faster by output row)
  at::Tensor inv_ws;
  if (!per_scan && k > 1 && c * src.element_size() >= 1024) {
    inv_ws = at::full({k, L}, -1, rows.options());
    p.inv_ws = inv_ws.data_ptr<int>();
  }
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  launch_sum_rows(p, ssd::dtype_code(dt), wide, sms, at::cuda::getCurrentCUDAStream());
  MLM_CHECK_LAUNCH();
  return out;
}

}  // namespace
}  // namespace msc
}  // namespace mlmamba

TORCH_LIBRARY_IMPL(mlmamba, CUDA, m) {
  m.impl("msc_sum_rows", &mlmamba::msc::msc_sum_rows_cuda);
  m.impl("msc_gather_rows", &mlmamba::msc::msc_gather_rows_cuda);
}
