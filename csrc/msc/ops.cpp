// Host glue of the fused msc_scan forward (issue 8): argument checks, the fp32 per-scan
// parameters, the shared conv of B and C (bc_conv.cu), and the wgmma SSD kernel's MSC mode
// (csrc/ssd/fwd_msc.cuh), which reads xBC and dt through the scan orders, fuses the conv of x
// and merges the scans.
// Schemas: csrc/registration.cpp. Inputs the kernel does not take get an error here;
// mlmamba_kernels.msc_scan sends them to the unfused kernels instead.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdlib>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "common/check.h"
#include "msc/msc.h"
#include "ssd/fwd.h"
#include "ssd/host.h"

namespace mlmamba {
namespace msc {
namespace {

using OptT = std::optional<at::Tensor>;

void check_param(const char* name, const at::Tensor& t, const at::Tensor& x,
                 at::IntArrayRef shape) {
  ssd::check_like("msc_scan", name, t, x, "xBC", shape);
}

// orders as int32, checked to be k permutations of range(L). The check needs the values on
// the host (one sync), so checked orders are remembered: the entry holds the caller's tensor
// (its memory cannot be reused while cached) and its version (in-place edits miss the cache);
// inference tensors have no version and are checked every time.
// While a CUDA graph is captured nothing can sync: orders not seen before go unchecked (the
// kernel ignores positions outside range(L) instead of touching memory out of bounds).
at::Tensor checked_orders(const at::Tensor& orders, int64_t L) {
  struct Entry {
    at::Tensor src, as_int;
    uint32_t version;
  };
  static std::mutex mu;
  static std::deque<Entry> cache;
  // inference tensors carry no version counter: checked on every call
  const bool cacheable = !orders.is_inference();
  const uint32_t version =
      cacheable ? orders.unsafeGetTensorImpl()->version_counter().current_version() : 0;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& e : cache)
      if (e.src.is_same(orders) && e.version == version) return e.as_int;
  }
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  if (capturing) return orders.to(at::kInt).contiguous();
  const auto sorted = std::get<0>(orders.sort(1));
  const bool ok = sorted.eq(at::arange(L, orders.options()).unsqueeze(0)).all().item<bool>();
  MLM_CHECK(ok, "msc_scan: every row of orders must be a permutation of range(", L, ")");
  at::Tensor as_int = orders.to(at::kInt).contiguous();
  if (!cacheable) return as_int;
  std::lock_guard<std::mutex> lock(mu);
  cache.push_front({orders, as_int, version});
  if (cache.size() > 8) cache.pop_back();
  return as_int;
}

using Outs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// out, and what the backward would recompute, each where asked (else an empty tensor): with
// save_conv each scan's conv outputs in scan order, conv_x (b, L, k, h, p) and conv_bc
// (b, L, 2, k, g n) (B, then C); with save_states each chunk's entry state, states (b,
// ceil(L / 64), k, h, p, n) bf16. The scans sit side by side: viewed as one SSD of k h heads
// and k g groups, they are its backward's x, B, C and chunk_states. Only the warp-specialized
// kernel saves: asked where it cannot run, this raises.
Outs msc_scan_fwd_cuda(const at::Tensor& xBC_in, const at::Tensor& dt, const at::Tensor& A,
                       const at::Tensor& D, const at::Tensor& conv_weight, const OptT& conv_bias,
                       const at::Tensor& dt_bias, const at::Tensor& orders, int64_t headdim,
                       int64_t ngroups, double dt_min, double dt_max, c10::string_view merge,
                       bool save_conv, bool save_states) {
  const char* op = "msc_scan";
  MLM_CHECK(xBC_in.is_cuda() && xBC_in.dim() == 3, op,
            ": xBC must be a 3-dim (batch, seqlen, conv_dim) CUDA tensor, got ", xBC_in.sizes(),
            " on ", xBC_in.device());
  MLM_CHECK(xBC_in.scalar_type() == at::kBFloat16, op,
            ": the fused CUDA kernel takes bfloat16 xBC, got ", xBC_in.scalar_type(),
            " (mlmamba_kernels.msc_scan runs other dtypes on the unfused kernels)");
  const int64_t b = xBC_in.size(0), L = xBC_in.size(1), cd = xBC_in.size(2);
  MLM_CHECK(dt.dim() == 3 && dt.size(0) == b && dt.size(1) == L, op,
            ": dt must have shape (", b, ", ", L, ", nheads), got ", dt.sizes());
  const int64_t h = dt.size(2);
  check_param("dt", dt, xBC_in, {b, L, h});
  MLM_CHECK(headdim == 64, op, ": the fused CUDA kernel takes headdim 64, got ", headdim);
  MLM_CHECK(ngroups >= 1 && h % ngroups == 0, op, ": ngroups=", ngroups, " does not divide ", h,
            " heads");
  const int64_t rest = cd - h * headdim;
  MLM_CHECK(rest > 0 && rest % (2 * ngroups) == 0, op, ": xBC width ", cd,
            " is not h*headdim + 2*ngroups*d_state (h=", h, ", headdim=", headdim,
            ", ngroups=", ngroups, ")");
  const int64_t n = rest / (2 * ngroups);
  MLM_CHECK(n == 64 || n == 128, op, ": the fused CUDA kernel takes d_state 64 or 128, got ", n);
  MLM_CHECK(conv_weight.dim() == 3, op, ": conv_weight must have 3 dims (k, conv_dim, width), got ",
            conv_weight.sizes());
  const int64_t k = conv_weight.size(0);
  check_param("conv_weight", conv_weight, xBC_in, {k, cd, 4});
  if (conv_bias) check_param("conv_bias", *conv_bias, xBC_in, {k, cd});
  check_param("A", A, xBC_in, {k, h});
  check_param("D", D, xBC_in, {k, h});
  check_param("dt_bias", dt_bias, xBC_in, {k, h});
  MLM_CHECK(orders.device() == xBC_in.device() && orders.scalar_type() == at::kLong &&
                orders.sizes() == at::IntArrayRef({k, L}),
            op, ": orders must be an int64 tensor of shape (", k, ", ", L, ") on ",
            xBC_in.device(), ", got ", orders.scalar_type(), " ", orders.sizes(), " on ",
            orders.device());
  MLM_CHECK(k >= 1 && k <= 65535, op, ": between 1 and 65535 scans, got k = ", k);
  MLM_CHECK(merge == "mean" || merge == "sum" || merge == "none", op,
            ": merge must be 'mean', 'sum' or 'none', got '", std::string(merge), "'");
  MLM_CHECK(b <= 65535, op, ": at most 65535 batch rows, got ", b);
  MLM_CHECK(k * b <= INT_MAX, op, ": k * batch must be below 2^31, got ", k * b);
  MLM_CHECK(L < INT_MAX, op, ": seqlen must be below 2^31, got ", L);
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  MLM_CHECK(prop.major == 9, op, ": the fused CUDA kernel needs an sm_90 GPU, got sm_", prop.major,
            prop.minor);

  c10::cuda::CUDAGuard guard(xBC_in.device());
  const bool none = merge == "none";
  at::Tensor out = none ? at::empty({k, b, L, h, headdim}, xBC_in.options())
                        : at::empty({b, L, h, headdim}, xBC_in.options());
  const int64_t nchunks = (L + 63) / 64;
  MLM_CHECK(!save_states || k * b * nchunks * h <= INT_MAX, op,
            ": save_states takes k * batch * chunks * nheads below 2^31");
  // the saved tensors, or empty ones (outputs must not alias)
  auto empty0 = [&]() { return at::empty({0}, xBC_in.options()); };
  at::Tensor conv_x = save_conv ? at::empty({b, L, k, h, headdim}, xBC_in.options()) : empty0();
  at::Tensor states =
      save_states ? at::empty({b, nchunks, k, h, headdim, n}, xBC_in.options()) : empty0();
  if (b == 0 || L == 0 || h == 0)
    return {out, conv_x,
            save_conv ? at::empty({b, L, 2, k, ngroups * n}, xBC_in.options()) : empty0(), states};
  // 16-byte rows for cp.async: the last dim contiguous, other strides multiples of 8
  at::Tensor xBC = xBC_in;
  if (xBC.stride(2) != 1 || xBC.stride(1) % 8 || xBC.stride(0) % 8 ||
      reinterpret_cast<uintptr_t>(xBC.data_ptr()) % 16)
    xBC = xBC.contiguous();
  const at::Tensor ord = checked_orders(orders, L);
  auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor Af = f32(A), Df = f32(D), dtbf = f32(dt_bias), wf = f32(conv_weight);
  at::Tensor bf;
  if (conv_bias) bf = f32(*conv_bias);
  at::Tensor acc;
  if (!none && k > 1) acc = at::empty({b, L, h, headdim}, xBC.options().dtype(at::kFloat));

  const int64_t nbc = 2 * ngroups * n;
  at::Tensor bc = at::empty({b, L, 2, k, ngroups * n}, xBC.options());
  msc::BcConvParams bp{};
  bp.xBC = reinterpret_cast<const __nv_bfloat16*>(xBC.data_ptr());
  bp.x_b = xBC.stride(0);
  bp.x_l = xBC.stride(1);
  bp.col0 = h * headdim;
  bp.conv_dim = cd;
  bp.nch = static_cast<int>(nbc);
  bp.batch = b;
  bp.seqlen = L;
  bp.nscans = static_cast<int>(k);
  bp.orders = ord.data_ptr<int>();
  bp.w = wf.data_ptr<float>();
  bp.bias = conv_bias ? bf.data_ptr<float>() : nullptr;
  bp.out = reinterpret_cast<__nv_bfloat16*>(bc.data_ptr());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_bc_conv(bp, stream);
  MLM_CHECK_LAUNCH();

  ssd::FwdParams prm = ssd::fwd_params(L, h, headdim, ngroups, b);
  {  // TMA maps of the conv'd B and C as (b, L, k g, n) for the warp-specialized kernel
    const at::Tensor bcv = bc.view({b, L, 2, k * ngroups, n});
    prm.tma = ssd::encode_tile_map(&prm.tm_B, bcv.select(2, 0)) &&
              ssd::encode_tile_map(&prm.tm_C, bcv.select(2, 1));
  }
  // the saved tensors' TMA maps: the conv'd x tiles through tm_x, the states through tm_S
  // (16-row boxes: a warp's rows of the state tile)
  if (save_conv)
    prm.msc.save_x = ssd::encode_tile_map(&prm.tm_x, conv_x.view({b, L, k * h, headdim}));
  if (save_states)
    prm.msc.save_states =
        ssd::encode_tile_map(&prm.tm_S, states.view({b * nchunks * k * h, headdim, 1, n}), 16);
  MLM_CHECK(prm.msc.save_x == save_conv && prm.msc.save_states == save_states, op,
            ": cannot encode the TMA maps of the saved tensors");
  const auto* base = static_cast<const at::BFloat16*>(xBC.data_ptr());
  const auto* bcp = static_cast<const at::BFloat16*>(bc.data_ptr());
  prm.x = base;
  prm.B = bcp;
  prm.C = bcp + k * ngroups * n;
  prm.x_b = xBC.stride(0);
  prm.x_l = xBC.stride(1);
  prm.B_b = prm.C_b = L * k * nbc;
  prm.B_l = prm.C_l = k * nbc;
  prm.x_h = headdim;
  prm.x_p = prm.B_n = prm.C_n = 1;
  prm.B_g = prm.C_g = n;
  prm.dt = dt.data_ptr();
  prm.dt_b = dt.stride(0); prm.dt_l = dt.stride(1); prm.dt_h = dt.stride(2);
  prm.dt_dtype = ssd::dtype_code(dt.scalar_type());
  prm.A = Af.data_ptr<float>();
  prm.D = Df.data_ptr<float>();
  prm.D_h = 1; prm.D_p = 0;
  prm.dt_bias = dtbf.data_ptr<float>();
  prm.dt_softplus = true;
  prm.has_dt_limit = !(dt_min == 0.0 && dt_max == std::numeric_limits<double>::infinity());
  prm.dt_min = static_cast<float>(dt_min);
  prm.dt_max = static_cast<float>(dt_max);
  prm.out = out.data_ptr();
  const at::Tensor o4 = none ? out.select(0, 0) : out;
  prm.out_b = o4.stride(0); prm.out_l = o4.stride(1); prm.out_h = o4.stride(2); prm.out_p = 1;
  prm.vec_loads = true;
  prm.msc.nscans = static_cast<int>(k);
  prm.msc.orders = ord.data_ptr<int>();
  prm.msc.conv_w = wf.data_ptr<float>();
  prm.msc.conv_b = conv_bias ? bf.data_ptr<float>() : nullptr;
  prm.msc.conv_dim = cd;
  prm.msc.acc = acc.defined() ? acc.data_ptr<float>() : nullptr;
  prm.msc.merge = none ? 0 : merge == "sum" ? 1 : 2;
  prm.msc.out_s = none ? out.stride(0) : 0;
  prm.msc.bc_s = ngroups * n;
  // acc rows to L2 at their chunk's top: H200 call 4 (docs/perf-log.md), 1281-1292 µs against
  // 1329-1334 a chunk ahead and 1337-1351 without. Developer A/B: MLMAMBA_MSC_PREFETCH=0/1/2.
  const char* pf_env = std::getenv("MLMAMBA_MSC_PREFETCH");
  prm.msc.prefetch = pf_env ? std::atoi(pf_env) : 1;
  // each (scan, row, head, chunk)'s vectors from the pre-pass (csrc/ssd/fwd_wgmma.cu), as in
  // ssd_scan; MLMAMBA_SSD_FWD_VEC=0 keeps warp 0 computing them in the walk (A/B)
  const char* vec_env = std::getenv("MLMAMBA_SSD_FWD_VEC");
  at::Tensor vec_buf;
  if (!(vec_env && std::string(vec_env) == "0"))
    vec_buf = ssd::attach_vec_buf(prm, k * b, (L + 63) / 64, xBC.options());
  // the warp-specialized kernel where it can run (H200 session 8 call 1, cross k4 b32: 1234
  // vs 1281 µs merge mean, 1115 vs 1253 none); MLMAMBA_MSC_WS=0 keeps the one-warpgroup kernel
  const char* ws_env = std::getenv("MLMAMBA_MSC_WS");
  const bool ws = !(ws_env && std::string(ws_env) == "0");
  // merge none: a CTA per (row, head, scan), the scans being independent (H200, session 30:
  // -20% at bidirectional b1 h80, -33% at cross b1, 1-2% at 8-10 waves of (row, head) CTAs;
  // never slower in 15 cases). MLMAMBA_MSC_SPLIT=0 keeps a CTA per (row, head) (A/B).
  const char* split_env = std::getenv("MLMAMBA_MSC_SPLIT");
  prm.msc.split = none && k > 1 && k <= 65535 && !(split_env && std::string(split_env) == "0");
  const char* why = ws ? ssd::launch_msc_fwd_ws(prm, static_cast<int>(n), stream)
                       : "MLMAMBA_MSC_WS=0 is set";
  prm.msc.split = false;  // the one-warpgroup kernel runs the k scans in each CTA
  MLM_CHECK(why == nullptr || !(save_conv || save_states), op,
            ": save_conv / save_states need the warp-specialized kernel, which cannot run: ", why);
  if (why != nullptr) why = ssd::launch_msc_fwd_wgmma(prm, static_cast<int>(n), stream);
  MLM_CHECK(why == nullptr, op, ": the fused CUDA kernel cannot run: ", why);
  MLM_CHECK_LAUNCH();
  return {out, conv_x, save_conv ? bc : empty0(), states};
}

}  // namespace
}  // namespace msc
}  // namespace mlmamba

TORCH_LIBRARY_IMPL(mlmamba, CUDA, m) { m.impl("msc_scan_fwd", &mlmamba::msc::msc_scan_fwd_cuda); }
