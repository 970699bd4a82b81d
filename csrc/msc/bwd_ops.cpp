// Host glue of msc_bwd_saved: msc_scan's CUDA backward where the forward saved its conv outputs
// or chunk states, the batched path of mlmamba_kernels/msc.py's unfused_backward in C++ (the
// same ops in the same order, without ~30 Python-level tensor ops a step): dout and dt
// gathered through the orders, the k scans' SSDs as one ssd_scan_bwd of k h heads, one
// msc_conv_bwd of the k scans, msc_sum_rows through the inverse orders. The ops are called
// through the dispatcher. Schema: csrc/registration.cpp; reference: mlmamba_kernels/msc.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "msc/msc.h"

namespace mlmamba {
namespace msc {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
using Grads7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensor gather(const Tensor& src, const Tensor& rows, double scale) {
  static const auto h = handle<Tensor(const Tensor&, const Tensor&, double)>(
      "mlmamba::msc_gather_rows");
  return h.call(src, rows, scale);
}

Tensor sum_rows(const std::vector<Tensor>& srcs, const Tensor& inv) {
  static const auto h = handle<Tensor(at::TensorList, const Tensor&, double)>(
      "mlmamba::msc_sum_rows");
  if (static_cast<int>(srcs.size()) <= kMaxSumScans) return h.call(srcs, inv, 1.0);
  // running sums in raster order, fp32 (the same arithmetic as msc_sum_rows)
  Tensor tot;
  for (size_t i = 0; i < srcs.size(); ++i) {
    const Tensor u = srcs[i].index_select(1, inv[i].to(at::kLong)).to(at::kFloat);
    tot = i == 0 ? u : tot.add_(u);
  }
  return tot.to(srcs[0].scalar_type());
}

Grads7 msc_bwd_saved_cuda(const Tensor& dout, const Tensor& xBC, const Tensor& dt, const Tensor& A,
                          const Tensor& D, const Tensor& cw, const OptT& cb, const Tensor& dtb,
                          const Tensor& rows, const Tensor& inv, int64_t headdim, int64_t ngroups,
                          double dt_min, double dt_max, c10::string_view merge, double dy_scale,
                          const OptT& conv_x, const OptT& conv_bc, const OptT& states) {
  const char* op = "msc_bwd_saved";
  MLM_CHECK(xBC.is_cuda() && xBC.dim() == 3 && dt.dim() == 3, op,
            ": xBC (b, L, d) and dt (b, L, h) must be CUDA tensors, got ", xBC.sizes(), ", ",
            dt.sizes());
  const int64_t b = xBC.size(0), L = xBC.size(1), cd = xBC.size(2), h = dt.size(2);
  const int64_t k = rows.size(0), p = headdim, g = ngroups, gn = (cd - h * p) / 2, n = gn / g;
  const bool saved_conv = conv_x.has_value() && conv_x->numel() > 0;
  const bool saved_states = states.has_value() && states->numel() > 0;
  MLM_CHECK(saved_conv || saved_states, op, ": needs the forward's conv outputs or chunk states");
  MLM_CHECK(rows.sizes() == at::IntArrayRef({k, L}) && inv.sizes() == rows.sizes() &&
                rows.scalar_type() == at::kInt && inv.scalar_type() == at::kInt,
            op, ": rows and inv must be int32 tensors of shape (k, ", L, "), got ", rows.sizes(),
            " ", rows.scalar_type(), ", ", inv.sizes(), " ", inv.scalar_type());
  const c10::cuda::CUDAGuard guard(xBC.device());
  const bool none = merge == "none";
  const Tensor src = none ? dout.reshape({k, b, L, h * p}) : dout.reshape({b, L, h * p});
  const Tensor dy = gather(src, rows, dy_scale).view({b, L, k * h, p});
  const Tensor dts = gather(dt, rows, 1.0).view({b, L, k * h});

  // x (b, L, k, h p) and B / C (b, L, 2, k, g n): the forward's, or recomputed through the
  // orders and laid out so
  Tensor x, bc;
  if (saved_conv) {
    x = *conv_x;
    bc = *conv_bc;
  } else {
    static const auto conv_fwd = handle<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                               const OptT&)>("mlmamba::msc_conv_fwd");
    x = at::empty({b, L, k, h * p}, xBC.options());
    bc = at::empty({b, L, 2, k, gn}, xBC.options());
    for (int64_t j = 0; j < k; ++j) {
      const Tensor u = conv_fwd.call(xBC, rows[j], cw[j], cb ? OptT((*cb)[j]) : OptT());
      x.select(2, j).copy_(u.narrow(-1, 0, h * p));
      bc.select(3, j).copy_(u.narrow(-1, h * p, 2 * gn).unflatten(-1, {2, gn}));
    }
  }
  const Tensor bcv = bc.reshape({b, L, 2, k * g, n});
  const OptT cs = saved_states ? OptT(states->view({b, -1, k * h, p, n})) : std::nullopt;
  using SsdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const OptT&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
      const Tensor&, int64_t, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
      const OptT&, bool, double, double, const OptT&);
  static const auto ssd_bwd = handle<SsdSig>("mlmamba::ssd_scan_bwd");
  auto r = ssd_bwd.call(dy, std::nullopt, x.reshape({b, L, k * h, p}), dts, A.reshape({k * h}),
                        bcv.select(2, 0), bcv.select(2, 1), 64, OptT(D.reshape({k * h})),
                        std::nullopt, OptT(dtb.reshape({k * h})), std::nullopt, std::nullopt,
                        std::nullopt, true, dt_min, dt_max, cs);
  const auto T = xBC.scalar_type();
  const Tensor gx = std::get<0>(r).reshape({b, L, k, h * p}).to(T);
  const Tensor gdt = std::get<1>(r).reshape({b, L, k, h});
  const Tensor gB = std::get<3>(r).reshape({b, L, k, gn}).to(T);
  const Tensor gC = std::get<4>(r).reshape({b, L, k, gn}).to(T);

  // the k scans' conv backward in one launch (x through the orders, dx (k, b, L, d) in scan
  // order), then the sums
  static const auto conv_bwd = handle<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const OptT&, at::TensorList)>(
      "mlmamba::msc_conv_bwd");
  const auto c = conv_bwd.call(xBC, rows, cw, cb, {gx, gB, gC});
  const Tensor dxBC = sum_rows(std::get<0>(c).unbind(0), inv);
  const Tensor ddt = sum_rows(gdt.unbind(2), inv);
  return {dxBC.to(T),
          ddt.to(dt.scalar_type()),
          std::get<2>(r).reshape({k, h}).to(A.scalar_type()),
          std::get<5>(r).reshape({k, h}).to(D.scalar_type()),
          std::get<1>(c).to(cw.scalar_type()),
          cb ? std::get<2>(c).to(cb->scalar_type()) : at::empty({0}, xBC.options()),
          std::get<7>(r).reshape({k, h}).to(dtb.scalar_type())};
}

}  // namespace
}  // namespace msc
}  // namespace mlmamba

TORCH_LIBRARY_IMPL(mlmamba, CUDA, m) { m.impl("msc_bwd_saved", &mlmamba::msc::msc_bwd_saved_cuda); }
