// Host glue of the SSD forward scan and the decode step: argument checks, outputs, launches.
// Schemas: csrc/registration.cpp; semantics: docs/ops.md.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "common/check.h"
#include "common/tensor_map.h"
#include "ssd/fwd.h"
#include "ssd/fwd_split.h"
#include "ssd/host.h"

namespace mlmamba {
namespace ssd {

// A 4-D bf16 map of t (b, l, j, cols) as (cols, l, j, b) with 64 x 64 boxes and the 128-byte
// swizzle of the wgmma tiles; reads past the end fill zeros. Strides of size-1 dims are free in
// torch: any multiple of 16 bytes does.
bool encode_tile_map(CUtensorMap* map, const at::Tensor& t, int box_rows) {
  const auto enc = tensor_map_encoder();
  if (!enc) return false;
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(t.size(3)), static_cast<cuuint64_t>(t.size(1)),
                        static_cast<cuuint64_t>(t.size(2)), static_cast<cuuint64_t>(t.size(0))};
  const int order[3] = {1, 2, 0};  // torch dim of map dims 1..3
  cuuint64_t strides[3];
  for (int k = 0; k < 3; ++k) {
    const int d = order[k];
    strides[k] = t.size(d) == 1 ? 16 : static_cast<cuuint64_t>(t.stride(d)) * 2;
    if (strides[k] % 16) return false;
  }
  cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1}, estr[4] = {1, 1, 1, 1};
  return enc(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, t.data_ptr(), dims, strides, box, estr,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

namespace {

using OptT = std::optional<at::Tensor>;

void check_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                 at::IntArrayRef shape, bool floating = true) {
  check_like(op, name, t, x, "x", shape, floating);
}

void check_D(const char* op, const at::Tensor& D, const at::Tensor& x, int64_t h, int64_t p) {
  MLM_CHECK(D.is_cuda() && D.device() == x.device(), op, ": D must be on ", x.device(),
            " like x, got ", D.device());
  MLM_CHECK((D.dim() == 1 && D.size(0) == h) || (D.dim() == 2 && D.size(0) == h && D.size(1) == p),
            op, ": D must have shape (", h, ",) or (", h, ", ", p, "), got ", D.sizes());
  MLM_CHECK(is_float(D), op, ": D must be float32, float16 or bfloat16, got ", D.scalar_type());
}

bool valid_dstate(int64_t n) { return n == 16 || n == 32 || n == 64 || n == 128 || n == 256; }

// Rows contiguous in the last dim and 16-byte aligned at every index of the other dims.
bool rows_aligned16(const at::Tensor& t) {
  if (t.stride(-1) != 1 && t.size(-1) > 1) return false;
  const int64_t es = t.element_size();
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int d = 0; d < t.dim() - 1; ++d)
    if (t.size(d) > 1 && (t.stride(d) * es) % 16) return false;
  return true;
}

// Head channels per CTA: 64 was as fast as 32 or faster on every bench case (H100,
// docs/perf-log.md); 32 where 64 does not divide headdim or does not fit in shared memory.
int pick_pt(int64_t p, bool bf16, int64_t n, const cudaDeviceProp& prop) {
  int pt = p % 64 == 0 ? 64 : 32;
  if (const char* env = std::getenv("MLMAMBA_SSD_FWD_PT")) {  // developer override (bench)
    const int v = std::atoi(env);
    if ((v == 32 || v == 64) && p % v == 0) pt = v;
  }
  const int limit = static_cast<int>(prop.sharedMemPerBlockOptin);
  if (ssd_fwd_smem_bytes(bf16, static_cast<int>(n), pt) > limit) pt = 32;
  return pt;
}

std::tuple<at::Tensor, at::Tensor> ssd_scan_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B_in,
    const at::Tensor& C_in, int64_t chunk_size, const OptT& D, const OptT& z, const OptT& dt_bias,
    const OptT& initial_states, const OptT& seq_idx, const OptT& cu_seqlens, bool dt_softplus,
    double dt_min, double dt_max, bool return_final_states) {
  const char* op = "ssd_scan";
  MLM_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  MLM_CHECK(x_in.dim() == 4, op, ": x must have 4 dims (batch, seqlen, nheads, headdim), got ",
            x_in.sizes());
  MLM_CHECK(is_float(x_in), op, ": x must be float32, float16 or bfloat16, got ",
            x_in.scalar_type());
  const int64_t b = x_in.size(0), l = x_in.size(1), h = x_in.size(2), p = x_in.size(3);
  check_input(op, "dt", dt, x_in, {b, l, h});
  check_input(op, "A", A, x_in, {h});
  MLM_CHECK(B_in.dim() == 4, op, ": B must have 4 dims (batch, seqlen, ngroups, dstate), got ",
            B_in.sizes());
  const int64_t g = B_in.size(2), n = B_in.size(3);
  check_input(op, "B", B_in, x_in, {b, l, g, n});
  check_input(op, "C", C_in, x_in, {b, l, g, n});
  MLM_CHECK(B_in.scalar_type() == x_in.scalar_type() && C_in.scalar_type() == x_in.scalar_type(),
            op, ": B and C must have x's dtype ", x_in.scalar_type(), ", got ",
            B_in.scalar_type(), " and ", C_in.scalar_type());
  MLM_CHECK(g >= 1 && h % g == 0, op, ": B has ", g, " groups, which does not divide ", h,
            " heads");
  MLM_CHECK(valid_dstate(n), op, ": the CUDA kernel supports dstate 16, 32, 64, 128 or 256, got ",
            n);
  MLM_CHECK(p % 32 == 0 && p > 0, op,
            ": the CUDA kernel supports headdim a multiple of 32 (32, 64, 128, ...), got ", p);
  MLM_CHECK(chunk_size >= 1, op, ": chunk_size must be positive, got ", chunk_size);
  if (D) check_D(op, *D, x_in, h, p);
  if (z) check_input(op, "z", *z, x_in, {b, l, h, p});
  if (dt_bias) check_input(op, "dt_bias", *dt_bias, x_in, {h});
  if (seq_idx) {
    check_input(op, "seq_idx", *seq_idx, x_in, {b, l}, false);
    MLM_CHECK(seq_idx->scalar_type() == at::kInt, op, ": seq_idx must be int32, got ",
              seq_idx->scalar_type());
  }
  int64_t nrows = b;
  at::Tensor cu;
  if (cu_seqlens) {
    MLM_CHECK(cu_seqlens->is_cuda() && cu_seqlens->device() == x_in.device(), op,
              ": cu_seqlens must be on ", x_in.device(), " like x, got ", cu_seqlens->device());
    MLM_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2 &&
                  cu_seqlens->scalar_type() == at::kInt,
              op, ": cu_seqlens must be a 1-D int32 tensor of at least 2 offsets, got ",
              cu_seqlens->sizes(), " ", cu_seqlens->scalar_type());
    MLM_CHECK(b == 1, op, ": cu_seqlens packs sequences into batch 1, but x has batch ", b);
    cu = cu_seqlens->contiguous();
    nrows = cu.numel() - 1;
  }
  if (initial_states) check_input(op, "initial_states", *initial_states, x_in, {nrows, h, p, n});
  MLM_CHECK(nrows <= 65535, op, ": at most 65535 batch rows / packed sequences, got ", nrows);

  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in, B = B_in, C = C_in;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16) {  // the bf16 kernel copies rows with 16-byte cp.async: take a copy of odd layouts
    if (!rows_aligned16(x)) x = x.contiguous();
    if (!rows_aligned16(B)) B = B.contiguous();
    if (!rows_aligned16(C)) C = C.contiguous();
  }
  at::Tensor out = at::empty({b, l, h, p}, x.options());
  at::Tensor final_states = return_final_states
                                ? at::empty({nrows, h, p, n}, x.options().dtype(at::kFloat))
                                : at::empty({0}, x.options());
  if (nrows == 0 || h == 0) return {out, final_states};

  const at::Tensor Af = A.to(at::kFloat).contiguous();
  at::Tensor Df, dtbf;
  if (D) Df = D->to(at::kFloat).contiguous();
  if (dt_bias) dtbf = dt_bias->to(at::kFloat).contiguous();

  FwdParams prm = fwd_params(l, h, p, g, nrows);
  prm.x = x.data_ptr();
  prm.dt = dt.data_ptr();
  prm.A = Af.data_ptr<float>();
  prm.B = B.data_ptr();
  prm.C = C.data_ptr();
  prm.D = D ? Df.data_ptr<float>() : nullptr;
  prm.z = z ? z->data_ptr() : nullptr;
  prm.dt_bias = dt_bias ? dtbf.data_ptr<float>() : nullptr;
  prm.init = initial_states ? initial_states->data_ptr() : nullptr;
  prm.seq_idx = seq_idx ? seq_idx->data_ptr<int>() : nullptr;
  prm.cu_seqlens = cu_seqlens ? cu.data_ptr<int>() : nullptr;
  prm.out = out.data_ptr();
  prm.final_states = return_final_states ? final_states.data_ptr<float>() : nullptr;
  prm.x_b = x.stride(0); prm.x_l = x.stride(1); prm.x_h = x.stride(2); prm.x_p = x.stride(3);
  prm.dt_b = dt.stride(0); prm.dt_l = dt.stride(1); prm.dt_h = dt.stride(2);
  prm.B_b = B.stride(0); prm.B_l = B.stride(1); prm.B_g = B.stride(2); prm.B_n = B.stride(3);
  prm.C_b = C.stride(0); prm.C_l = C.stride(1); prm.C_g = C.stride(2); prm.C_n = C.stride(3);
  if (z) {
    prm.z_b = z->stride(0); prm.z_l = z->stride(1); prm.z_h = z->stride(2); prm.z_p = z->stride(3);
    prm.z_dtype = dtype_code(z->scalar_type());
  }
  prm.out_b = out.stride(0); prm.out_l = out.stride(1); prm.out_h = out.stride(2); prm.out_p = 1;
  if (initial_states) {
    const auto& s = *initial_states;
    prm.init_b = s.stride(0); prm.init_h = s.stride(1); prm.init_p = s.stride(2);
    prm.init_n = s.stride(3);
    prm.init_dtype = dtype_code(s.scalar_type());
  }
  if (seq_idx) { prm.seq_b = seq_idx->stride(0); prm.seq_l = seq_idx->stride(1); }
  if (D) { prm.D_h = D->dim() == 1 ? 1 : p; prm.D_p = D->dim() == 1 ? 0 : 1; }
  prm.dt_dtype = dtype_code(dt.scalar_type());
  prm.dt_softplus = dt_softplus;
  prm.has_dt_limit = !(dt_min == 0.0 && dt_max == std::numeric_limits<double>::infinity());
  prm.dt_min = static_cast<float>(dt_min);
  prm.dt_max = static_cast<float>(dt_max);
  prm.vec_loads = rows_aligned16(x) && rows_aligned16(B) && rows_aligned16(C);
  MLM_CHECK(prm.vec_loads || !bf16, op, ": internal: bf16 rows not 16-byte aligned");

  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  MLM_CHECK(prop.major >= 8, op, ": the CUDA kernel needs compute capability 8.0 or newer, got ",
            prop.major, ".", prop.minor);
  const int pt = pick_pt(p, bf16, n, prop);
  // dstate 128: when every CTA has an SM to itself, give it the registers of two (no spills)
  prm.one_cta_regs = nrows * h * (p / pt) <= prop.multiProcessorCount;
  if (const char* env = std::getenv("MLMAMBA_SSD_FWD_MINB"))  // developer override (bench)
    prm.one_cta_regs = std::atoi(env) == 1;
  const int smem = ssd_fwd_smem_bytes(bf16, static_cast<int>(n), pt);
  MLM_CHECK(smem <= static_cast<int>(prop.sharedMemPerBlockOptin), op, ": dstate ", n, " with ",
            x.scalar_type(), " inputs needs ", smem, " bytes of shared memory per block; this GPU has ",
            prop.sharedMemPerBlockOptin);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int code = dtype_code(x.scalar_type());
  // sm_90a: the wgmma kernel where it applies (bf16, headdim 64, dstate 64 / 128, aligned
  // rows); it was faster than mma.sync on every bench case (docs/perf-log.md). Developer
  // override MLMAMBA_SSD_FWD_IMPL: "wgmma" or "ws" (an error where it cannot run) or "mma".
  const char* impl_env = std::getenv("MLMAMBA_SSD_FWD_IMPL");
  const std::string impl = impl_env ? impl_env : "";
  // wgmma kernel: tiles by TMA where the tensor maps can describe x, B and C (7% faster than
  // cp.async, H200, docs/perf-log.md v7); not with cu_seqlens, where a box would run into the
  // next sequence instead of zeros. MLMAMBA_SSD_FWD_TMA=0 keeps cp.async, =require makes it an
  // error where TMA cannot be used.
  const char* tma_env = std::getenv("MLMAMBA_SSD_FWD_TMA");
  const std::string tma_mode = tma_env ? tma_env : "";
  if (tma_mode != "0" && code == 2 && prop.major == 9 && p == 64 &&
      (n == 64 || n == 128) && prm.vec_loads && !cu_seqlens && impl != "mma")
    prm.tma = encode_tile_map(&prm.tm_x, x) && encode_tile_map(&prm.tm_B, B) &&
              encode_tile_map(&prm.tm_C, C);
  MLM_CHECK(tma_mode != "require" || prm.tma, op,
            ": MLMAMBA_SSD_FWD_TMA=require, but these inputs cannot use TMA tile loads");
  // wgmma kernels: each chunk's vectors from a parallel pre-pass (no serial per-chunk work
  // in the walk); MLMAMBA_SSD_FWD_VEC=0 keeps warp 0 computing them in the walk. Not with
  // cu_seqlens (rows of different lengths); the sequence split sizes its own buffer.
  const char* vec_env = std::getenv("MLMAMBA_SSD_FWD_VEC");
  const bool vectors = !(vec_env && std::string(vec_env) == "0") && !cu_seqlens && l > 0;
  at::Tensor vec_buf;
  if (impl == "wgmma" || impl == "ws") {  // asked for by name: no silent fallback, no split
    MLM_CHECK(code == 2 && prop.major == 9, op, ": MLMAMBA_SSD_FWD_IMPL=", impl, " needs bf16 x ",
              "on an sm_90 GPU, got ", x.scalar_type(), " on sm_", prop.major, prop.minor);
    if (vectors) vec_buf = attach_vec_buf(prm, nrows, (l + 63) / 64, x.options());
    const char* why = impl == "ws" ? launch_ssd_fwd_ws(prm, static_cast<int>(n), stream)
                                   : launch_ssd_fwd_wgmma(prm, static_cast<int>(n), stream);
    MLM_CHECK(why == nullptr, op, ": MLMAMBA_SSD_FWD_IMPL=", impl, ": ", why);
    MLM_CHECK_LAUNCH();
    return {out, final_states};
  }
  if (impl != "mma" && code == 2 && prop.major == 9 && p == 64 && (n == 64 || n == 128) &&
      prm.vec_loads) {
    // the warp-specialized kernel (fwd_ws.cu) where it can run: TMA tiles and the pre-pass
    // (H200, docs/perf-log.md v9 / v11: b4 L2048 h80 233 -> 163 µs, b32 L576 135 -> 119); else the
    // one-warpgroup wgmma kernel. MLMAMBA_SSD_FWD_WS=0 keeps the latter (A/B).
    const char* ws_env = std::getenv("MLMAMBA_SSD_FWD_WS");
    const bool ws = !(ws_env && std::string(ws_env) == "0");
    // long sequences on few (row, head) pairs: split the sequence (fwd_split.cpp)
    const int nseg = (seq_idx || cu_seqlens) ? 1 : pick_segments(nrows, h, l, prop);
    if (nseg > 1 && ssd_fwd_wgmma_split(prm, static_cast<int>(n), nseg, dt, A, dt_bias,
                                        initial_states, dt_softplus, dt_min, dt_max,
                                        final_states, vectors, ws, stream) == nullptr) {
      MLM_CHECK_LAUNCH();
      return {out, final_states};
    }
    if (vectors) vec_buf = attach_vec_buf(prm, nrows, (l + 63) / 64, x.options());
    if ((ws && launch_ssd_fwd_ws(prm, static_cast<int>(n), stream) == nullptr) ||
        launch_ssd_fwd_wgmma(prm, static_cast<int>(n), stream) == nullptr) {
      MLM_CHECK_LAUNCH();
      return {out, final_states};
    }
  }
  const bool ok = code == 2   ? launch_ssd_fwd_bf16(prm, static_cast<int>(n), pt, stream)
                  : code == 1 ? launch_ssd_fwd_f16(prm, static_cast<int>(n), pt, stream)
                              : launch_ssd_fwd_f32(prm, static_cast<int>(n), pt, stream);
  MLM_CHECK(ok, op, ": no kernel for dstate ", n);
  MLM_CHECK_LAUNCH();
  return {out, final_states};
}

at::Tensor ssd_state_update_cuda(const at::Tensor& state_in, const at::Tensor& x,
                                 const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const OptT& D, const OptT& z,
                                 const OptT& dt_bias, bool dt_softplus) {
  const char* op = "ssd_state_update";
  MLM_CHECK(state_in.is_cuda(), op, ": state must be a CUDA tensor, got ", state_in.device());
  MLM_CHECK(state_in.dim() == 4, op, ": state must have 4 dims (batch, nheads, headdim, dstate), got ",
            state_in.sizes());
  MLM_CHECK(state_in.scalar_type() == at::kFloat || state_in.scalar_type() == at::kBFloat16, op,
            ": state must be float32 or bfloat16, got ", state_in.scalar_type());
  const int64_t b = state_in.size(0), h = state_in.size(1), p = state_in.size(2),
                n = state_in.size(3);
  check_input(op, "x", x, state_in, {b, h, p});
  check_input(op, "dt", dt, state_in, {b, h});
  check_input(op, "A", A, state_in, {h});
  MLM_CHECK(B.dim() == 3, op, ": B must have 3 dims (batch, ngroups, dstate), got ", B.sizes());
  const int64_t g = B.size(1);
  check_input(op, "B", B, state_in, {b, g, n});
  check_input(op, "C", C, state_in, {b, g, n});
  MLM_CHECK(B.scalar_type() == C.scalar_type(), op, ": B and C must have one dtype, got ",
            B.scalar_type(), " and ", C.scalar_type());
  MLM_CHECK(g >= 1 && h % g == 0, op, ": B has ", g, " groups, which does not divide ", h,
            " heads");
  MLM_CHECK(valid_dstate(n), op, ": the CUDA kernel supports dstate 16, 32, 64, 128 or 256, got ",
            n);
  if (D) check_D(op, *D, state_in, h, p);
  if (z) check_input(op, "z", *z, state_in, {b, h, p});
  if (dt_bias) check_input(op, "dt_bias", *dt_bias, state_in, {h});

  c10::cuda::CUDAGuard guard(state_in.device());
  at::Tensor out = at::empty({b, h, p}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  // the kernel streams 16-byte vectors of each state row; other layouts work on a copy
  at::Tensor state = rows_aligned16(state_in) ? state_in : state_in.contiguous();
  const at::Tensor Af = A.to(at::kFloat).contiguous();
  at::Tensor Df, dtbf;
  if (D) Df = D->to(at::kFloat).contiguous();
  if (dt_bias) dtbf = dt_bias->to(at::kFloat).contiguous();

  UpdateParams prm{};
  prm.batch = b; prm.nheads = h; prm.headdim = p; prm.dstate = n;
  prm.heads_per_group = static_cast<int>(h / g);
  prm.state = state.data_ptr();
  prm.x = x.data_ptr(); prm.dt = dt.data_ptr(); prm.A = Af.data_ptr<float>();
  prm.B = B.data_ptr(); prm.C = C.data_ptr();
  prm.D = D ? Df.data_ptr<float>() : nullptr;
  prm.z = z ? z->data_ptr() : nullptr;
  prm.dt_bias = dt_bias ? dtbf.data_ptr<float>() : nullptr;
  prm.out = out.data_ptr();
  prm.s_b = state.stride(0); prm.s_h = state.stride(1); prm.s_p = state.stride(2);
  prm.x_b = x.stride(0); prm.x_h = x.stride(1); prm.x_p = x.stride(2);
  prm.dt_b = dt.stride(0); prm.dt_h = dt.stride(1);
  prm.B_b = B.stride(0); prm.B_g = B.stride(1); prm.B_n = B.stride(2);
  prm.C_b = C.stride(0); prm.C_g = C.stride(1); prm.C_n = C.stride(2);
  if (z) { prm.z_b = z->stride(0); prm.z_h = z->stride(1); prm.z_p = z->stride(2); }
  if (D) { prm.D_h = D->dim() == 1 ? 1 : p; prm.D_p = D->dim() == 1 ? 0 : 1; }
  prm.x_dtype = dtype_code(x.scalar_type());
  prm.dt_dtype = dtype_code(dt.scalar_type());
  prm.bc_dtype = dtype_code(B.scalar_type());
  prm.z_dtype = z ? dtype_code(z->scalar_type()) : 0;
  prm.dt_softplus = dt_softplus;
  prm.bc_vec = rows_aligned16(B) && rows_aligned16(C);
  const bool ok = launch_ssd_update(prm, state.scalar_type() == at::kBFloat16,
                                    at::cuda::getCurrentCUDAStream());
  MLM_CHECK(ok, op, ": no kernel for dstate ", n);
  MLM_CHECK_LAUNCH();
  if (!state.is_same(state_in)) state_in.copy_(state);
  return out;
}

}  // namespace
}  // namespace ssd
}  // namespace mlmamba

TORCH_LIBRARY_IMPL(mlmamba, CUDA, m) {
  m.impl("ssd_scan_fwd", &mlmamba::ssd::ssd_scan_fwd_cuda);
  m.impl("ssd_state_update", &mlmamba::ssd::ssd_state_update_cuda);
}
