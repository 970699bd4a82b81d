// Host glue for the causal conv1d ops: argument checks, layout choice, output allocation,
// launch on the current stream. Schemas: csrc/registration.cpp; contract: docs/ops.md.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "common/check.h"
#include "common/tensor_map.h"
#include "conv1d/conv1d.h"
#include "conv1d/host.h"

namespace mlmamba {
namespace conv1d {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;


void check_float(const char* op, const Tensor& t, const char* name) {
  MLM_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                t.scalar_type() == at::kBFloat16,
            op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_device(const char* op, const Tensor& x, const Tensor& t, const char* name) {
  MLM_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
            x.device());
}

// weight (d, w) with 2 <= w <= 8 and bias (d,): float, on x's device. Returns w.
int check_weight_bias(const char* op, const Tensor& x, const Tensor& weight, const OptT& bias,
                      int64_t d) {
  MLM_CHECK(weight.dim() == 2 && weight.size(0) == d, op, ": weight must have shape (", d,
            ", width), got ", weight.sizes());
  const int w = static_cast<int>(weight.size(1));
  MLM_CHECK(w >= 2 && w <= 8, op, ": width (weight.size(1)) must be 2..8, got ", w);
  check_float(op, weight, "weight");
  check_device(op, x, weight, "weight");
  if (present(bias)) {
    MLM_CHECK(bias->dim() == 1 && bias->size(0) == d, op, ": bias must have shape (", d,
              "), got ", bias->sizes());
    check_float(op, *bias, "bias");
    check_device(op, x, *bias, "bias");
  }
  return w;
}

// out (or dx) in x's layout rule: channel-last if x.stride(1) == 1 and d > 1.
bool is_chlast(const Tensor& x) { return x.size(1) > 1 && x.stride(1) == 1; }

Tensor like_layout(const Tensor& x, bool chlast) {
  const auto b = x.size(0), d = x.size(1), l = x.size(2);
  return chlast ? at::empty({b, l, d}, x.options()).transpose(1, 2) : at::empty({b, d, l}, x.options());
}

// Tensor t with the same fast dim as the chosen kernel (copy only if needed).
Tensor fast_dim(const Tensor& t, bool chlast) {
  if (chlast) return t.stride(1) == 1 ? t : t.transpose(1, 2).contiguous().transpose(1, 2);
  return (t.stride(2) == 1 || t.size(2) == 1) ? t : t.contiguous();
}

// Checks shared by fwd and bwd; returns the width.
int check_common(const char* op, const Tensor& x, const Tensor& weight, const OptT& bias,
                 const OptT& init, const OptT& seq) {
  MLM_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  MLM_CHECK(x.dim() == 3, op, ": x must have shape (batch, dim, seqlen), got ", x.sizes());
  check_float(op, x, "x");
  const auto b = x.size(0), d = x.size(1), l = x.size(2);
  const int w = check_weight_bias(op, x, weight, bias, d);
  if (present(init)) {
    MLM_CHECK(init->dim() == 3 && init->size(0) == b && init->size(1) == d && init->size(2) == w - 1,
              op, ": initial_states must have shape (", b, ", ", d, ", ", w - 1, "), got ",
              init->sizes());
    check_float(op, *init, "initial_states");
    check_device(op, x, *init, "initial_states");
  }
  if (present(seq)) {
    MLM_CHECK(seq->dim() == 2 && seq->size(0) == b && seq->size(1) == l, op,
              ": seq_idx must have shape (", b, ", ", l, "), got ", seq->sizes());
    MLM_CHECK(seq->scalar_type() == at::kInt, op, ": seq_idx must be int32, got ",
              seq->scalar_type());
    check_device(op, x, *seq, "seq_idx");
  }
  return w;
}

// Fills the fields shared by fwd and bwd. x must already have its kernel's fast dim.
ConvParams make_params(const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& init,
                       const Tensor& seq, bool silu, const Tensor& out) {
  ConvParams p{};
  p.batch = x.size(0);
  p.dim = x.size(1);
  p.seqlen = x.size(2);
  p.width = static_cast<int>(weight.size(1));
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_b = x.stride(0);
  p.x_d = x.stride(1);
  p.x_l = x.size(2) == 1 ? 1 : x.stride(2);
  set_weight_bias(p, weight, bias);
  p.init_dtype = dtag(x);
  if (present(init)) {
    p.init = init->data_ptr();
    p.init_b = init->stride(0);
    p.init_d = init->stride(1);
    p.init_k = init->stride(2);
    p.init_dtype = dtag(*init);
  }
  if (seq.defined()) {
    p.seq = seq.data_ptr<int>();
    p.seq_b = seq.stride(0);
    p.seq_l = 1;
  }
  p.out = out.data_ptr();
  p.out_b = out.stride(0);
  p.out_d = out.stride(1);
  p.out_l = out.size(2) == 1 ? 1 : out.stride(2);
  return p;
}

}  // namespace

// MLMAMBA_CONV1D_CHUNK (tuning): rows per warp for the channel-last v2 kernels, at least 1;
// 0 where unset or empty
static int64_t forced_chunk() {
  const char* e = std::getenv("MLMAMBA_CONV1D_CHUNK");
  return e && *e ? std::max<int64_t>(1, std::atoll(e)) : 0;
}

// Rows per warp for channel-last (v2 kernels): the longest of start, start/2, ... (>= 16) that
// still gives warps_per_sm warps per SM of a 132-SM GPU, so that the w-1 re-read rows at each
// chunk start stay a small fraction. MLMAMBA_CONV1D_CHUNK overrides it (for tuning).
static int64_t pick_chunk(int64_t b, int64_t d, int64_t l, int64_t lanes_channels, int64_t start,
                          int64_t warps_per_sm) {
  if (const int64_t forced = forced_chunk()) return forced;
  const int64_t cgroups = (d + lanes_channels - 1) / lanes_channels;
  int64_t chunk = start;
  while (chunk > 16 && b * ((l + chunk - 1) / chunk) * cgroups < 132 * warps_per_sm) chunk /= 2;
  return chunk;
}

// The channel-last v2 backward: a warp walks a chunk of rows of one batch row and 128
// channels, in one of two layouts: "flat", one chunk a warp over all (row, chunk) items and a
// dweight slot a warp; "blocked", 4 consecutive chunks of one row a block (idle warps past the
// row's end) summed on chip into a slot a block. The plan minimizes waves x (chunk + 16) x (1 +
// the workspace's share of the bytes), over chunks of 16..576 rows (multiples of 8) and both
// layouts: the 16 rows stand for a chunk's fixed cost (w-1 re-read rows, weights, setup); a
// warp streams at a rate of its own, so a wave's idle block slots are bandwidth lost (H200,
// causal_conv1d v16: b4 L2048 1.06 waves of 208-row chunks 31% slower than 0.95 of 232).
// MLMAMBA_CONV1D_CHUNK forces the chunk, MLMAMBA_CONV1D_TUNE=46 / 47 the layout.
int64_t plan_bwd_chlast(ConvParams& p, int esize) {
  const int64_t cgroups = (p.dim + 127) / 128, L = p.seqlen;
  const int64_t slots = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
                        bwd_chlast_blocks_per_sm(p.width);  // block slots
  const int64_t forced = forced_chunk();
  const int tune = tune_variant();
  double best = -1;
  for (int64_t c = forced ? forced : 16; c <= (forced ? forced : 576); c += 8) {
    const int64_t n = (L + c - 1) / c;  // chunks per row
    for (const bool flat : {true, false}) {
      if ((tune == 46 && !flat) || (tune == 47 && flat)) continue;
      const int64_t blocks = (flat ? (p.batch * n + 3) / 4 : p.batch * ((n + 3) / 4)) * cgroups;
      const int64_t per_row = flat ? n : (n + 3) / 4;  // dweight slots, each written and read
      const double ws = 2.0 * per_row * (p.width + 1) * 4 / (3.0 * L * esize);
      const double cost = double((blocks + slots - 1) / slots) * double(c + 16) * (1 + ws);
      if (best < 0 || cost < best) {
        best = cost;
        p.chunk = c;
        p.chunk_blocks = flat ? 0 : (n + 3) / 4;
        p.nslots_per_batch = per_row;
      }
    }
  }
  return p.batch * p.nslots_per_batch;
}

int64_t pick_chunk_fwd_chlast(int64_t b, int64_t d, int64_t l) {
  return pick_chunk(b, d, l, 256, 64, 24);  // ~24 warps/SM: 3+ waves at 8-12 resident
}

// Which kernels run. Default, where pipe_ok says a fast path applies: on sm_90 the TMA kernel
// for the channel-last forward (use_tma); the one-shot kernels for the l-contiguous forward and
// backward (the backward at 16-bit widths <= 4 and where a row fits one tile); the streaming
// kernels (pipe.cuh) for the channel-last forward off sm_90 and the other l-contiguous
// backwards; v2 for the channel-last backward (each the fastest measured on an H200:
// docs/perf-log.md, causal_conv1d); v2 elsewhere (seq_idx, unaligned inputs).
// MLMAMBA_CONV1D_IMPL=pipe or =v2 forces one where it applies, =oneshot the one-shot
// l-contiguous kernels (A/B timing; read per call); any other non-empty value is an error.
static std::string conv_impl(const char* op) {
  const char* e = std::getenv("MLMAMBA_CONV1D_IMPL");
  const std::string impl = e != nullptr ? e : "";
  MLM_CHECK(impl.empty() || impl == "pipe" || impl == "v2" || impl == "oneshot", op,
            ": environment variable MLMAMBA_CONV1D_IMPL must be 'pipe', 'v2', 'oneshot' or unset, got '",
            impl, "'");
  return impl;
}

bool use_pipe(const char* op, const ConvParams& p, int esize, bool chlast, bool bwd) {
  const std::string impl = conv_impl(op);
  if (impl == "v2" || !pipe_ok(p, esize, chlast, bwd)) return false;
  return impl == "pipe" || !(chlast && bwd);
}

bool use_oneshot(const char* op, const ConvParams& p, int esize, bool chlast, bool bwd) {
  // The backward by default where a row fits one 4 KB tile, and at 16-bit widths <= 4 (its
  // unrolled configuration) for any length: on an H200 2.5% faster than the streaming kernel at
  // b1 L16384 since session 17 (156 against 160 us; 16% slower before, perf-log v6 / v8).
  // Rows off 16-byte boundaries (no streaming kernel takes them) take it in either direction.
  const std::string impl = conv_impl(op);
  const bool dflt = impl.empty() && (!bwd || p.seqlen * esize <= 4096 || (esize == 2 && p.width <= 4) ||
                                     !pipe_ok(p, esize, chlast, bwd));
  return !chlast && (impl == "oneshot" || dflt) && oneshot_ok(p, esize, bwd);
}

// The channel-last forward's TMA kernel (fwd_chlast_tma.cu): by default where the streaming
// kernel applies (pipe_ok: 16-byte aligned rows, d % 8 == 0, no seq_idx), on an sm_90 GPU.
static bool use_tma(const char* op, const ConvParams& p, int esize) {
  return conv_impl(op).empty() && pipe_ok(p, esize, true, false) && p.rows == nullptr &&
         at::cuda::getCurrentDeviceProperties()->major == 9 && tensor_map_encoder() != nullptr;
}

namespace {

Tensor seq_contig(const OptT& seq) {
  if (!present(seq)) return Tensor();
  return (seq->stride(1) == 1 || seq->size(1) == 1) ? *seq : seq->contiguous();
}

std::tuple<Tensor, Tensor> causal_conv1d_fwd(const Tensor& x_in, const Tensor& weight,
                                             const OptT& bias, const OptT& init, const OptT& seq_in,
                                             bool silu, bool return_final_states) {
  const char* op = "causal_conv1d_fwd";
  const int w = check_common(op, x_in, weight, bias, init, seq_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto b = x_in.size(0), d = x_in.size(1), l = x_in.size(2);
  const bool chlast = is_chlast(x_in);
  Tensor out = like_layout(x_in, chlast);
  Tensor final_states = return_final_states ? at::empty({b, d, w - 1}, x_in.options())
                                            : at::empty({0}, x_in.options());
  if (b == 0 || d == 0) return {out, final_states};
  if (l == 0) {  // nothing to convolve: final states are the initial states (or zeros)
    if (return_final_states) {
      if (present(init)) final_states.copy_(*init);
      else final_states.zero_();
    }
    return {out, final_states};
  }
  const Tensor x = fast_dim(x_in, chlast);
  const Tensor seq = seq_contig(seq_in);
  ConvParams p = make_params(x, weight, bias, init, seq, silu, out);
  if (return_final_states) p.final_states = final_states.data_ptr();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int esize = static_cast<int>(x.element_size());
  const bool pipe = use_pipe(op, p, esize, chlast, false);
  if (use_oneshot(op, p, esize, chlast, false)) {
    fwd_lcontig_oneshot(p, dtag(x), stream);
  } else if (chlast && use_tma(op, p, esize)) {
    fwd_chlast_tma(p, dtag(x), stream);
  } else if (chlast && pipe) {
    fwd_chlast_pipe(p, dtag(x), stream);
  } else if (chlast) {
    p.chunk = pick_chunk_fwd_chlast(b, d, l);
    fwd_chlast(p, dtag(x), stream);
  } else if (pipe) {
    fwd_lcontig_pipe(p, dtag(x), stream);
  } else {
    fwd_lcontig(p, dtag(x), stream);
  }
  return {out, final_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> causal_conv1d_bwd(
    const Tensor& x_in, const Tensor& weight, const OptT& bias, const OptT& init,
    const OptT& seq_in, const Tensor& dout_in, const OptT& dfinal, bool silu) {
  const char* op = "causal_conv1d_bwd";
  const int w = check_common(op, x_in, weight, bias, init, seq_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto b = x_in.size(0), d = x_in.size(1), l = x_in.size(2);
  MLM_CHECK(dout_in.sizes() == x_in.sizes(), op, ": dout must have shape ", x_in.sizes(), ", got ",
            dout_in.sizes());
  check_device(op, x_in, dout_in, "dout");
  const bool has_dfinal = present(dfinal) && dfinal->numel() > 0;
  if (has_dfinal) {
    MLM_CHECK(dfinal->dim() == 3 && dfinal->size(0) == b && dfinal->size(1) == d &&
                  dfinal->size(2) == w - 1,
              op, ": dfinal_states must have shape (", b, ", ", d, ", ", w - 1, "), got ",
              dfinal->sizes());
    check_float(op, *dfinal, "dfinal_states");
    check_device(op, x_in, *dfinal, "dfinal_states");
  }
  const bool chlast = is_chlast(x_in);
  Tensor dx = like_layout(x_in, chlast);
  Tensor dweight = at::empty({d, w}, weight.options());
  Tensor dbias = present(bias) ? at::empty({d}, bias->options()) : at::empty({0}, x_in.options());
  Tensor dinit = present(init) ? at::empty({b, d, w - 1}, init->options())
                               : at::empty({0}, x_in.options());
  if (d == 0) return {dx, dweight, dbias, dinit};
  if (b == 0 || l == 0) {  // only dfinal flows (into dinit when l == 0)
    dweight.zero_();
    if (dbias.numel()) dbias.zero_();
    if (dinit.numel()) {
      if (has_dfinal) dinit.copy_(*dfinal);
      else dinit.zero_();
    }
    return {dx, dweight, dbias, dinit};
  }
  const Tensor x = fast_dim(x_in, chlast);
  const Tensor dout = fast_dim(dout_in.scalar_type() == x.scalar_type() ? dout_in
                                                                       : dout_in.to(x.scalar_type()),
                               chlast);
  const Tensor seq = seq_contig(seq_in);
  ConvParams p = make_params(x, weight, bias, init, seq, silu, dx);
  p.dout = dout.data_ptr();
  p.dout_b = dout.stride(0);
  p.dout_d = dout.stride(1);
  p.dout_l = dout.size(2) == 1 ? 1 : dout.stride(2);
  p.dfinal_dtype = p.init_dtype;
  if (has_dfinal) {
    p.dfinal = dfinal->data_ptr();
    p.dfinal_b = dfinal->stride(0);
    p.dfinal_d = dfinal->stride(1);
    p.dfinal_k = dfinal->stride(2);
    p.dfinal_dtype = dtag(*dfinal);
  }
  if (dinit.numel()) p.dinit = dinit.data_ptr();
  const bool pipe = use_pipe(op, p, static_cast<int>(x.element_size()), chlast, true);
  const bool oneshot = use_oneshot(op, p, static_cast<int>(x.element_size()), chlast, true);
  int64_t nslots;  // dweight/dbias workspace slots
  if (chlast && pipe) {  // one slot per block; blocks share a channel group
    p.nslots_per_batch = bwd_chlast_pipe_slots(p, dtag(x));
    nslots = p.nslots_per_batch;
  } else if (chlast) {  // a slot per chunk or per block of 4 (plan_bwd_chlast)
    nslots = plan_bwd_chlast(p, static_cast<int>(x.element_size()));
  } else {  // one slot per tile
    p.nslots_per_batch = oneshot ? bwd_lcontig_oneshot_tiles(p, dtag(x))
                         : pipe  ? bwd_lcontig_pipe_tiles(p, dtag(x))
                                 : bwd_lcontig_tiles(l);
    nslots = b * p.nslots_per_batch;
  }
  Tensor partial = at::empty({nslots, d, w + 1}, x.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (chlast && pipe) bwd_chlast_pipe(p, dtag(x), stream);
  else if (chlast) bwd_chlast(p, dtag(x), stream);
  else if (oneshot) bwd_lcontig_oneshot(p, dtag(x), stream);
  else if (pipe) bwd_lcontig_pipe(p, dtag(x), stream);
  else bwd_lcontig(p, dtag(x), stream);
  reduce_dweight(p, nslots, dweight.data_ptr(), dbias.numel() ? dbias.data_ptr() : nullptr, stream);
  return {dx, dweight, dbias, dinit};
}

Tensor causal_conv1d_update(const Tensor& x, Tensor& conv_state, const Tensor& weight,
                            const OptT& bias, bool silu) {
  const char* op = "causal_conv1d_update";
  MLM_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  MLM_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must have shape (batch, dim) or (batch, dim, seqlen), got ",
            x.sizes());
  check_float(op, x, "x");
  const auto b = x.size(0), d = x.size(1), l = x.dim() == 3 ? x.size(2) : 1;
  const int w = check_weight_bias(op, x, weight, bias, d);
  MLM_CHECK(conv_state.dim() == 3 && conv_state.size(0) == b && conv_state.size(1) == d &&
                conv_state.size(2) == w - 1,
            op, ": conv_state must have shape (", b, ", ", d, ", ", w - 1, "), got ",
            conv_state.sizes());
  check_float(op, conv_state, "conv_state");
  check_device(op, x, conv_state, "conv_state");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options());
  if (b == 0 || d == 0 || l == 0) return out;
  UpdateParams p{};
  p.batch = b;
  p.dim = d;
  p.seqlen = l;
  p.width = w;
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_b = x.stride(0);
  p.x_d = x.stride(1);
  p.x_l = x.dim() == 3 ? x.stride(2) : 0;
  p.state = conv_state.data_ptr();
  p.st_b = conv_state.stride(0);
  p.st_d = conv_state.stride(1);
  p.st_k = conv_state.stride(2);
  p.st_dtype = dtag(conv_state);
  set_weight_bias(p, weight, bias);
  p.out = out.data_ptr();
  p.out_b = out.stride(0);
  p.out_d = out.stride(1);
  p.out_l = x.dim() == 3 ? out.stride(2) : 0;
  update(p, dtag(x), c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mlmamba, CUDA, m) {
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd);
  m.impl("causal_conv1d_update", &causal_conv1d_update);
}

}  // namespace conv1d
}  // namespace mlmamba
