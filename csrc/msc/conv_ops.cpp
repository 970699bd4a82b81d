// Host glue of msc_conv_fwd / msc_conv_bwd: the causal conv (SiLU) of msc_scan's backward along
// one scan order, reading xBC's raster rows through the order (conv1d's channel-last kernels in
// rows mode, conv1d.h) instead of a gathered copy. Schemas: csrc/registration.cpp;
// references: mlmamba_kernels/msc.py; contract: docs/ops.md.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "conv1d/conv1d.h"
#include "conv1d/host.h"
#include "ssd/host.h"

namespace mlmamba {
namespace msc {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
using conv1d::dtag;
using conv1d::present;
using ssd::is_float;

// Checks xBC (b, L, d), rows (L,) int32, weight (d, w), bias (d,), or with k scans (k > 0;
// msc_conv_bwd) rows (k, L), weight (k, d, w), bias (k, d); returns xBC with a unit channel
// stride (the kernels take 16-byte words where the rows allow).
Tensor check_inputs(const char* op, const Tensor& xBC, const Tensor& rows, const Tensor& weight,
                    const OptT& bias, int64_t k = 0) {
  MLM_CHECK(xBC.is_cuda() && xBC.dim() == 3 && is_float(xBC), op,
            ": xBC must be a 3-dim (batch, seqlen, dim) float32/float16/bfloat16 CUDA tensor, "
            "got ", xBC.scalar_type(), " ", xBC.sizes(), " on ", xBC.device());
  const int64_t L = xBC.size(1), d = xBC.size(2), lead = k > 0 ? 1 : 0;
  const std::string ks = k > 0 ? std::to_string(k) + ", " : "";
  MLM_CHECK(rows.device() == xBC.device() && rows.scalar_type() == at::kInt &&
                rows.dim() == 1 + lead && rows.size(lead) == L && (k == 0 || rows.size(0) == k),
            op, ": rows must be an int32 tensor of shape (", ks, L, ") on ", xBC.device(),
            ", got ", rows.scalar_type(), " ", rows.sizes(), " on ", rows.device());
  MLM_CHECK(L < (int64_t{1} << 31), op, ": seqlen must be below 2^31, got ", L);
  MLM_CHECK(weight.device() == xBC.device() && is_float(weight) && weight.dim() == 2 + lead &&
                (k == 0 || weight.size(0) == k) && weight.size(lead) == d &&
                weight.size(lead + 1) >= 2 && weight.size(lead + 1) <= 8,
            op, ": weight must be a float tensor of shape (", ks, d, ", width 2..8) on ",
            xBC.device(), ", got ", weight.scalar_type(), " ", weight.sizes(), " on ",
            weight.device());
  if (present(bias))
    MLM_CHECK(bias->device() == xBC.device() && is_float(*bias) && bias->dim() == 1 + lead &&
                  (k == 0 || bias->size(0) == k) && bias->size(lead) == d,
              op, ": bias must be a float tensor of shape (", ks, d, ") on ", xBC.device(),
              ", got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  return xBC.stride(2) == 1 ? xBC : xBC.contiguous();
}

conv1d::ConvParams make_params(const Tensor& x, const Tensor& rows, const Tensor& weight,
                               const OptT& bias, const Tensor& out) {
  conv1d::ConvParams p{};
  p.batch = x.size(0);
  p.seqlen = x.size(1);
  p.dim = x.size(2);
  p.width = static_cast<int>(weight.size(1));
  p.silu = true;
  p.x = x.data_ptr();
  p.x_b = x.stride(0);
  p.x_d = 1;
  p.x_l = x.stride(1);
  conv1d::set_weight_bias(p, weight, bias);
  p.init_dtype = p.dfinal_dtype = dtag(x);
  p.rows = rows.data_ptr<int>();
  p.out = out.data_ptr();
  p.out_b = out.stride(0);
  p.out_d = 1;
  p.out_l = out.stride(1);
  return p;
}

Tensor msc_conv_fwd_cuda(const Tensor& xBC_in, const Tensor& rows_in, const Tensor& weight,
                         const OptT& bias) {
  const char* op = "msc_conv_fwd";
  const Tensor xBC = check_inputs(op, xBC_in, rows_in, weight, bias);
  const c10::cuda::CUDAGuard guard(xBC.device());
  Tensor out = at::empty(xBC.sizes(), xBC.options());
  if (out.numel() == 0) return out;
  const Tensor rows = rows_in.contiguous();
  conv1d::ConvParams p = make_params(xBC, rows, weight, bias, out);
  auto stream = at::cuda::getCurrentCUDAStream();
  // the streaming kernel where it applies, as causal_conv1d_fwd (MLMAMBA_CONV1D_IMPL)
  if (conv1d::use_pipe(op, p, static_cast<int>(xBC.element_size()), true, false)) {
    conv1d::fwd_chlast_pipe_rows(p, dtag(xBC), stream);
    return out;
  }
  p.chunk = conv1d::pick_chunk_fwd_chlast(p.batch, p.dim, p.seqlen);
  conv1d::fwd_chlast_rows(p, dtag(xBC), stream);
  return out;
}

// One scan: rows (L,), weight (d, w), dout pieces (b, L, c_i) -> dx (b, L, d). k scans in one
// launch: rows (k, L), weight (k, d, w), bias (k, d), dout pieces (b, L, k, c_i) -> dx
// (k, b, L, d), dweight (k, d, w), dbias (k, d) (ConvParams::scan_rows).
std::tuple<Tensor, Tensor, Tensor> msc_conv_bwd_cuda(const Tensor& xBC_in, const Tensor& rows_in,
                                                     const Tensor& weight, const OptT& bias,
                                                     at::TensorList dout) {
  const char* op = "msc_conv_bwd";
  const int64_t k = rows_in.dim() == 2 ? rows_in.size(0) : 0;  // 0: one scan
  const Tensor xBC = check_inputs(op, xBC_in, rows_in, weight, bias, k);
  const int64_t b = xBC.size(0), L = xBC.size(1), d = xBC.size(2), w = weight.size(-1);
  const int64_t np = static_cast<int64_t>(dout.size()), gd = k > 0 ? 4 : 3;
  MLM_CHECK(np >= 1 && np <= 3, op, ": dout must hold 1 to 3 tensors, got ", np);
  const std::string kshape = k > 0 ? std::to_string(k) + ", " : "";
  std::vector<Tensor> pieces;
  int64_t c0 = 0, split[2] = {d, d};
  for (int64_t i = 0; i < np; ++i) {
    const Tensor& g = dout[i];
    MLM_CHECK(g.device() == xBC.device() && g.scalar_type() == xBC.scalar_type() &&
                  g.dim() == gd && g.size(0) == b && g.size(1) == L && (k == 0 || g.size(2) == k),
              op, ": dout[", i, "] must be a ", xBC.scalar_type(), " tensor of shape (", b, ", ",
              L, ", ", kshape, "channels) on ", xBC.device(), ", got ", g.scalar_type(), " ",
              g.sizes(), " on ", g.device());
    const int64_t c = g.size(gd - 1);
    MLM_CHECK(i == np - 1 || c % 4 == 0, op, ": dout[", i,
              "] must have a multiple of 4 channels (all but the last piece), got ", c);
    if (c == 0) continue;  // an empty piece has no data pointer: skipped
    if (!pieces.empty()) split[pieces.size() - 1] = c0;
    c0 += c;
    pieces.push_back(g.stride(gd - 1) == 1 ? g : g.contiguous());
  }
  MLM_CHECK(c0 == d, op, ": the dout pieces must hold ", d, " channels in all, got ", c0);
  const c10::cuda::CUDAGuard guard(xBC.device());
  const int64_t kk = k > 0 ? k : 1;
  Tensor dx = k > 0 ? at::empty({k, b, L, d}, xBC.options()) : at::empty({b, L, d}, xBC.options());
  Tensor dweight = at::empty(weight.sizes(), weight.options());
  const bool has_bias = present(bias);
  Tensor dbias =
      has_bias ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, xBC.options());
  if (d == 0) return {dx, dweight, dbias};
  if (b == 0 || L == 0) {
    dweight.zero_();
    if (has_bias) dbias.zero_();
    return {dx, dweight, dbias};
  }
  const Tensor rows = rows_in.contiguous();
  const Tensor w0 = k > 0 ? weight[0] : weight;
  const OptT b0 = has_bias && k > 0 ? OptT((*bias)[0]) : bias;
  conv1d::ConvParams p = make_params(xBC, rows, w0, b0, dx.view({kk * b, L, d}));
  p.batch = kk * b;
  if (k > 0) {
    p.scan_rows = b;
    p.w_s = weight.stride(0);
    p.bias_ss = has_bias ? bias->stride(0) : 0;
  }
  p.dout = pieces[0].data_ptr();
  p.dout_b = pieces[0].stride(0);
  p.dout_d = 1;
  p.dout_l = pieces[0].stride(1);
  p.dout_s = k > 0 ? pieces[0].stride(2) : 0;
  for (size_t i = 1; i < pieces.size(); ++i) {
    p.dpiece[i - 1] = pieces[i].data_ptr();
    p.dpiece_b[i - 1] = pieces[i].stride(0);
    p.dpiece_l[i - 1] = pieces[i].stride(1);
    p.dpiece_s[i - 1] = k > 0 ? pieces[i].stride(2) : 0;
  }
  p.dsplit[0] = split[0];
  p.dsplit[1] = split[1];
  const int64_t nslots = conv1d::plan_bwd_chlast(p, static_cast<int>(xBC.element_size()));
  Tensor partial = at::empty({nslots, d, w + 1}, xBC.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  auto stream = at::cuda::getCurrentCUDAStream();
  conv1d::bwd_chlast_rows(p, dtag(xBC), stream);
  conv1d::reduce_dweight(p, nslots / kk, dweight.data_ptr(), has_bias ? dbias.data_ptr() : nullptr,
                         stream, kk);
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace msc
}  // namespace mlmamba

TORCH_LIBRARY_IMPL(mlmamba, CUDA, m) {
  m.impl("msc_conv_fwd", &mlmamba::msc::msc_conv_fwd_cuda);
  m.impl("msc_conv_bwd", &mlmamba::msc::msc_conv_bwd_cuda);
}
