// Host glue of the SSD scan backward: checks, workspaces, the three launches (bwd.h).
// Schema: csrc/registration.cpp; semantics: docs/ops.md (ssd_scan_bwd).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "common/check.h"
#include "ssd/bwd.h"
#include "ssd/host.h"

namespace mlmamba {
namespace ssd_bwd {
namespace {

using OptT = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor, at::Tensor>;
constexpr const char* kOp = "ssd_scan_bwd";
using ssd::check_like;
using ssd::is_float;

int code_of(at::ScalarType t) { return t == at::kHalf ? kF16 : t == at::kBFloat16 ? kBF16 : kF32; }

void check_arg(const char* name, const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
               bool floating = true) {
  check_like(kOp, name, t, x, "x", shape, floating);
}

at::Tensor empty_of(const at::Tensor& x) { return at::empty({0}, x.options()); }

// Rows contiguous in the last dim, every row start 16-byte aligned: 16-byte vector loads.
bool rows16(const at::Tensor& t) {
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int d = 0; d < t.dim() - 1; ++d)
    if (t.size(d) > 1 && t.stride(d) % 8) return false;
  return true;
}

Grads ssd_scan_bwd_cuda(const at::Tensor& dout_in, const OptT& dfinal, const at::Tensor& x,
                        const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B_in,
                        const at::Tensor& C_in, int64_t chunk_size, const OptT& D, const OptT& z_in,
                        const OptT& dt_bias, const OptT& initial_states, const OptT& seq_idx_in,
                        const OptT& cu_seqlens, bool dt_softplus, double dt_min, double dt_max,
                        const OptT& chunk_states) {
  MLM_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  MLM_CHECK(x.dim() == 4, kOp, ": x must have 4 dims (batch, seqlen, nheads, headdim), got ",
            x.sizes());
  MLM_CHECK(is_float(x), kOp, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t b = x.size(0), l = x.size(1), h = x.size(2), p = x.size(3);
  check_arg("dout", dout_in, x, {b, l, h, p});
  check_arg("dt", dt, x, {b, l, h});
  check_arg("A", A, x, {h});
  MLM_CHECK(B_in.dim() == 4, kOp, ": B must have 4 dims (batch, seqlen, ngroups, dstate), got ",
            B_in.sizes());
  const int64_t g = B_in.size(2), n = B_in.size(3);
  check_arg("B", B_in, x, {b, l, g, n});
  check_arg("C", C_in, x, {b, l, g, n});
  MLM_CHECK(g >= 1 && h % g == 0, kOp, ": B has ", g, " groups, which does not divide ", h,
            " heads");
  MLM_CHECK(p >= 1 && p <= 128, kOp, ": the CUDA kernel supports headdim 1..128, got ", p);
  MLM_CHECK(n >= 1 && n <= 256, kOp, ": the CUDA kernel supports dstate 1..256, got ", n);
  MLM_CHECK(chunk_size >= 1, kOp, ": chunk_size must be positive, got ", chunk_size);
  if (D)
    MLM_CHECK(D->is_cuda() && D->device() == x.device() && is_float(*D) &&
                  ((D->dim() == 1 && D->size(0) == h) ||
                   (D->dim() == 2 && D->size(0) == h && D->size(1) == p)),
              kOp, ": D must be a float CUDA tensor of shape (", h, ",) or (", h, ", ", p,
              ") on ", x.device(), ", got ", D->sizes(), " ", D->scalar_type(), " on ",
              D->device());
  if (z_in) check_arg("z", *z_in, x, {b, l, h, p});
  if (dt_bias) check_arg("dt_bias", *dt_bias, x, {h});
  const bool varlen = cu_seqlens.has_value();
  at::Tensor cu;
  int64_t nseq = b;
  if (varlen) {
    MLM_CHECK(cu_seqlens->is_cuda() && cu_seqlens->device() == x.device(), kOp,
              ": cu_seqlens must be on ", x.device(), " like x, got ", cu_seqlens->device());
    MLM_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2 &&
                  cu_seqlens->scalar_type() == at::kInt,
              kOp, ": cu_seqlens must be a 1-D int32 tensor of at least 2 offsets, got ",
              cu_seqlens->sizes(), " ", cu_seqlens->scalar_type());
    MLM_CHECK(b == 1, kOp, ": cu_seqlens packs sequences into batch 1, but x has batch ", b);
    MLM_CHECK(!seq_idx_in, kOp, ": give seq_idx or cu_seqlens, not both");
    cu = *cu_seqlens;
    nseq = cu.numel() - 1;
  }
  if (seq_idx_in) {
    check_arg("seq_idx", *seq_idx_in, x, {b, l}, false);
    MLM_CHECK(seq_idx_in->scalar_type() == at::kInt, kOp, ": seq_idx must be int32, got ",
              seq_idx_in->scalar_type());
  }
  if (initial_states) check_arg("initial_states", *initial_states, x, {nseq, h, p, n});
  if (dfinal) check_arg("dfinal_states", *dfinal, x, {nseq, h, p, n});
  if (chunk_states) {
    const auto& cs = *chunk_states;
    const int64_t nch = (l + kQ - 1) / kQ;
    MLM_CHECK(!varlen, kOp, ": chunk_states does not go with cu_seqlens");
    MLM_CHECK(cs.is_cuda() && cs.device() == x.device() && cs.scalar_type() == at::kBFloat16 &&
                  cs.is_contiguous() && cs.sizes() == at::IntArrayRef({b, nch, h, p, n}),
              kOp, ": chunk_states must be a contiguous bfloat16 tensor of shape (", b, ", ", nch,
              ", ", h, ", ", p, ", ", n, ") on ", x.device(), ", got ", cs.scalar_type(), " ",
              cs.sizes(), " on ", cs.device(), (cs.is_contiguous() ? "" : ", not contiguous"));
  }

  c10::cuda::CUDAGuard guard(x.device());
  const auto T = x.scalar_type();
  // dout, z, B, C are read in x's dtype (kernels are instantiated per dtype, not per mix)
  const at::Tensor dout = dout_in.scalar_type() == T ? dout_in : dout_in.to(T);
  const at::Tensor B = B_in.scalar_type() == T ? B_in : B_in.to(T);
  const at::Tensor C = C_in.scalar_type() == T ? C_in : C_in.to(T);
  at::Tensor z;
  if (z_in) z = z_in->scalar_type() == T ? *z_in : z_in->to(T);

  auto fopt = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({b, l, h, p}, x.options());
  at::Tensor ddt = at::empty({b, l, h}, dt.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dB = at::empty({b, l, g, n}, x.options());
  at::Tensor dC = at::empty({b, l, g, n}, x.options());
  at::Tensor dz = z_in ? at::empty({b, l, h, p}, x.options()) : empty_of(x);
  at::Tensor dinit = initial_states ? at::empty({nseq, h, p, n}, initial_states->options())
                                    : empty_of(x);
  at::Tensor dA32 = at::empty({h}, fopt);
  at::Tensor ddtb32 = dt_bias ? at::empty({h}, fopt) : at::empty({0}, fopt);
  at::Tensor dD32 = D ? at::empty(D->sizes(), fopt) : at::empty({0}, fopt);

  auto finish = [&]() -> Grads {
    at::Tensor dz_out = z_in ? (dz.scalar_type() == z_in->scalar_type() ? dz : dz.to(z_in->scalar_type()))
                             : dz;
    return {dx,
            ddt,
            dA32.to(A.scalar_type()),
            dB.scalar_type() == B_in.scalar_type() ? dB : dB.to(B_in.scalar_type()),
            dC.scalar_type() == C_in.scalar_type() ? dC : dC.to(C_in.scalar_type()),
            D ? dD32.to(D->scalar_type()) : empty_of(x),
            dz_out,
            dt_bias ? ddtb32.to(dt_bias->scalar_type()) : empty_of(x),
            dinit};
  };
  if (l == 0 || h == 0 || p == 0 || n == 0) {
    dx.zero_(); ddt.zero_(); dB.zero_(); dC.zero_(); dA32.zero_(); ddtb32.zero_(); dD32.zero_();
    if (z_in) dz.zero_();
    if (initial_states) {
      if (dfinal) dinit.copy_(*dfinal);
      else dinit.zero_();
    }
    return finish();
  }

  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  MLM_CHECK(prop.major >= 8, kOp, ": the CUDA kernel needs compute capability 8.0 or newer, got ",
            prop.major, ".", prop.minor);

  Params P{};
  P.b = int(b); P.l = int(l); P.h = int(h); P.p = int(p); P.g = int(g); P.n = int(n);
  P.npad = int((n + kNB - 1) / kNB * kNB);
  P.hpg = int(h / g);
  P.nseq = int(nseq);
  P.nch = int((l + kQ - 1) / kQ);
  P.nslots = varlen ? int((l + kQ - 1) / kQ + nseq) : int(b) * P.nch;
  MLM_CHECK(nseq * 2 < (int64_t(1) << 31) && P.nslots <= (1 << 30), kOp, ": too many sequences");
  MLM_CHECK(varlen || b <= 65535, kOp, ": at most 65535 batch rows, got ", b);
  P.varlen = varlen;
  P.has_seq_idx = seq_idx_in.has_value();
  P.has_z = z_in.has_value();
  P.has_D = D.has_value();
  P.D_per_p = D && D->dim() == 2;
  P.has_dt_bias = dt_bias.has_value();
  P.has_init = initial_states.has_value();
  P.has_dfinal = dfinal.has_value();
  P.softplus = dt_softplus;
  P.clamp = !(dt_min == 0.0 && dt_max == std::numeric_limits<double>::infinity());
  P.dt_min = float(dt_min);
  P.dt_max = float(dt_max);
  P.vec_x = rows16(x); P.vec_o = rows16(dout); P.vec_z = z_in && rows16(z);
  P.vec_B = rows16(B); P.vec_C = rows16(C);

  P.x = x.data_ptr();
  P.x_sb = x.stride(0); P.x_sl = x.stride(1); P.x_sh = x.stride(2); P.x_sp = x.stride(3);
  P.dout = dout.data_ptr();
  P.o_sb = dout.stride(0); P.o_sl = dout.stride(1); P.o_sh = dout.stride(2); P.o_sp = dout.stride(3);
  if (z_in) {
    P.z = z.data_ptr();
    P.z_sb = z.stride(0); P.z_sl = z.stride(1); P.z_sh = z.stride(2); P.z_sp = z.stride(3);
  }
  P.B = B.data_ptr();
  P.B_sb = B.stride(0); P.B_sl = B.stride(1); P.B_sg = B.stride(2); P.B_sn = B.stride(3);
  P.C = C.data_ptr();
  P.C_sb = C.stride(0); P.C_sl = C.stride(1); P.C_sg = C.stride(2); P.C_sn = C.stride(3);
  P.dt = dt.data_ptr(); P.dt_code = code_of(dt.scalar_type());
  P.dt_sb = dt.stride(0); P.dt_sl = dt.stride(1); P.dt_sh = dt.stride(2);
  P.A = A.data_ptr(); P.A_code = code_of(A.scalar_type()); P.A_s = A.stride(0);
  if (D) {
    P.D = D->data_ptr(); P.D_code = code_of(D->scalar_type());
    P.D_sh = D->stride(0); P.D_sp = D->dim() == 2 ? D->stride(1) : 0;
  }
  if (dt_bias) {
    P.dt_bias = dt_bias->data_ptr(); P.dtb_code = code_of(dt_bias->scalar_type());
    P.dtb_s = dt_bias->stride(0);
  }
  if (initial_states) {
    const auto& s = *initial_states;
    P.init = s.data_ptr(); P.init_code = code_of(s.scalar_type());
    P.i_ss = s.stride(0); P.i_sh = s.stride(1); P.i_sp = s.stride(2); P.i_sn = s.stride(3);
  }
  if (dfinal) {
    const auto& s = *dfinal;
    P.dfinal = s.data_ptr(); P.dfinal_code = code_of(s.scalar_type());
    P.f_ss = s.stride(0); P.f_sh = s.stride(1); P.f_sp = s.stride(2); P.f_sn = s.stride(3);
  }
  if (seq_idx_in) {
    P.seq_idx = seq_idx_in->data_ptr<int>();
    P.si_sb = seq_idx_in->stride(0); P.si_sl = seq_idx_in->stride(1);
  }
  at::Tensor offs;
  if (varlen) {
    P.cu = cu.data_ptr<int>(); P.cu_s = cu.stride(0);
    offs = at::empty({nseq + 1}, x.options().dtype(at::kInt));
    P.offs = offs.data_ptr<int>();
  }

  // workspaces: per-chunk states (bf16), per-split dB/dC partials and per-chunk scalars (fp32).
  // chunk_states (the states entering each chunk, from a forward that kept them: msc_scan) are
  // S_prev where the sm_90a walk runs: it then walks the adjoint alone (P.g_only)
  auto bopt = x.options().dtype(at::kBFloat16);
  const int64_t wsn = int64_t(P.nslots) * h * p * P.npad;
  const int tcode = code_of(T);
  const bool take_states = chunk_states && prop.major == 9 && wg_shape_ok(P, tcode);
  at::Tensor wsS = take_states ? chunk_states->view({wsn}) : at::empty({wsn}, bopt);
  at::Tensor wsG = at::empty({wsn}, bopt);

  // TMA maps of the inputs and the state workspaces for the sm_90a kernels (steps 1 and 2),
  // where their shape applies; they need the last dim contiguous and 16-byte aligned rows
  StatesMaps maps{};
  bool maps_ok = false;
  auto enc = [](CUtensorMap* m, const at::Tensor& t) {
    return t.dim() == 4 && t.stride(3) == 1 && rows16(t) && ssd::encode_tile_map(m, t);
  };
  const auto ws4 = [&](const at::Tensor& w) { return w.view({int64_t(P.nslots) * h, p, 1, P.npad}); };
  if (prop.major == 9 && wg_shape_ok(P, tcode)) {
    maps_ok = enc(&maps.x, x) && enc(&maps.o, dout) && (!z_in || enc(&maps.z, z)) &&
              enc(&maps.B, B) && enc(&maps.C, C) && enc(&maps.wsS, ws4(wsS)) &&
              enc(&maps.wsG, ws4(wsG));
  }
  // step 2: on sm_90a the wgmma kernel (bwd_chunk_wg.cu) where it applies, else bwd_chunk.cuh.
  // MLMAMBA_SSD_BWD_CHUNK=mma forces bwd_chunk.cuh (A/B), =wgmma the default
  const char* ck_env = std::getenv("MLMAMBA_SSD_BWD_CHUNK");
  const std::string ck_mode = ck_env ? ck_env : "";
  MLM_CHECK(ck_mode.empty() || ck_mode == "mma" || ck_mode == "wgmma", kOp,
            ": MLMAMBA_SSD_BWD_CHUNK must be mma or wgmma, got '", ck_mode, "'");
  const bool chunk_wg = ck_mode != "mma" && maps_ok && chunk_wg_ok(P, tcode);
  // step 2 variant: dB/dC partials on chip where they fit (MLMAMBA_SSD_BWD_PARTIALS=global
  // forces the per-head global read-modify-write, for comparisons)
  {
    const char* env = std::getenv("MLMAMBA_SSD_BWD_PARTIALS");
    const bool force_global = env && std::strcmp(env, "global") == 0;
    P.onchip = chunk_wg || (!force_global && chunk_onchip_fits(P, prop.sharedMemPerBlockOptin));
  }
  // head splits: the fewest waves times heads per block (step 2 sums dB/dC over a split's heads);
  // on chip: one block per SM whose groups share the heads, plus one head's worth of fixed
  // work per block (B/C tiles, the partials' write-out); the wgmma kernel: one block per SM
  // walking its heads, plus about two heads' worth (B/C, CB, the pipeline's start, the write)
  P.ctas_per_sm = P.onchip ? 1 : (p <= 64 ? 2 : 1);
  {
    const int groups = chunk_wg ? 1 : chunk_groups(P), extra = chunk_wg ? 2 : P.onchip ? 1 : 0;
    const int64_t base = int64_t(P.nslots) * g, slots = int64_t(P.ctas_per_sm) * prop.multiProcessorCount;
    int64_t best = -1, best_ns = 1;
    for (int ns = 1; ns <= std::min(P.hpg, 16); ++ns) {
      const int64_t hs = (P.hpg + ns - 1) / ns, ctas = base * ((P.hpg + hs - 1) / hs);
      const int64_t cost = (ctas + slots - 1) / slots * ((hs + groups - 1) / groups + extra);
      if (best < 0 || cost < best) { best = cost; best_ns = ns; }
    }
    // MLMAMBA_SSD_BWD_NSPLIT=n forces n head splits per group (developer A/B)
    if (const char* e = std::getenv("MLMAMBA_SSD_BWD_NSPLIT"); e && *e)
      best_ns = std::min<int64_t>(std::max(std::atoi(e), 1), std::min(P.hpg, 16));
    P.hsplit = int((P.hpg + best_ns - 1) / best_ns);
    P.nsplit = (P.hpg + P.hsplit - 1) / P.hsplit;
  }
  // (no dB/dC workspace where step 2 writes dB/dC itself: on chip with one split)
  const int64_t wbc = P.onchip && P.nsplit == 1 ? 0 : b * l * P.nsplit * g * P.npad;
  at::Tensor wsdB = at::empty({wbc}, fopt), wsdC = at::empty({wbc}, fopt);
  at::Tensor parts = at::empty({int64_t(P.nslots) * h * (2 + p)}, fopt);
  P.wsS = wsS.data_ptr(); P.wsG = wsG.data_ptr();
  P.wsdB = wsdB.data_ptr<float>(); P.wsdC = wsdC.data_ptr<float>();
  P.part_dA = parts.data_ptr<float>();
  P.part_ddtb = P.part_dA + int64_t(P.nslots) * h;
  P.part_dD = P.part_ddtb + int64_t(P.nslots) * h;

  P.dx = dx.data_ptr(); P.ddt = ddt.data_ptr(); P.dB = dB.data_ptr(); P.dC = dC.data_ptr();
  P.dz = z_in ? dz.data_ptr() : nullptr;
  P.dinit = initial_states ? dinit.data_ptr() : nullptr;
  P.dA = dA32.data_ptr<float>();
  P.ddtb = dt_bias ? ddtb32.data_ptr<float>() : nullptr;
  P.dD = D ? dD32.data_ptr<float>() : nullptr;

  const size_t smem = chunk_wg ? 0 : chunk_smem_bytes(P);
  MLM_CHECK(smem <= prop.sharedMemPerBlockOptin, kOp, ": headdim ", p, " with dstate ", n,
            " needs ", smem, " bytes of shared memory per block; this GPU has ",
            prop.sharedMemPerBlockOptin);

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (varlen) {
    launch_chunk_offsets(P, stream);
    MLM_CHECK_LAUNCH();
  }
  // step 1: on sm_90a the tensor-core walk (bwd_states_wg.cu) where it applies (2.4x the
  // mma.sync walk at b4 L2048, H200); else mma.sync streaming its tiles by cp.async, in 2
  // stages (4 CTAs/SM; faster than 3 at 3 CTAs/SM on 3 of 4 bench cases, H200).
  // MLMAMBA_SSD_BWD_STATES=s2 / s3 force the mma.sync walk with 2 / 3 stages, =sync its
  // one-chunk register prefetch (A/B; the three bitwise the same), =wgmma the default
  const char* st_env = std::getenv("MLMAMBA_SSD_BWD_STATES");
  const std::string st_mode = st_env ? st_env : "";
  MLM_CHECK(st_mode.empty() || st_mode == "sync" || st_mode == "s2" || st_mode == "s3" ||
                st_mode == "wgmma",
            kOp, ": MLMAMBA_SSD_BWD_STATES must be sync, s2, s3 or wgmma, got '", st_mode, "'");
  const int stages = st_mode == "sync" || !states_async_ok(P, tcode) ? 0
                     : st_mode == "s3"                                ? 3
                                                                      : 2;
  const bool wg = (st_mode.empty() || st_mode == "wgmma") && prop.major == 9 && stages > 0;
  at::Tensor vec, hrec;
  if (chunk_wg) {
    hrec = at::empty({int64_t(P.nslots) * h * kHeadRecB}, x.options().dtype(at::kByte));
    P.hrec = hrec.data_ptr();
  }
  if (stages > 0 || chunk_wg) {
    vec = at::empty({int64_t(P.nslots) * h * kVecW}, fopt);
    P.vec = vec.data_ptr<float>();
    launch_vectors(P, stream);
    MLM_CHECK_LAUNCH();
  }
  bool states_done = false;
  if (wg && maps_ok && states_wg_ok(P, tcode)) {
    P.g_only = take_states;
    states_done = launch_states_wg(P, maps, prop.multiProcessorCount, stream);
  }
  if (!states_done) {
    if (take_states) {  // the walk below writes S_prev too: not into the caller's tensor
      wsS = at::empty({wsn}, bopt);
      P.wsS = wsS.data_ptr();
      if (maps_ok) maps_ok = enc(&maps.wsS, ws4(wsS));
      MLM_CHECK(maps_ok || !chunk_wg, kOp, ": cannot encode the TMA map of the state workspace");
      P.g_only = false;
    }
    launch_states(P, tcode, stages, stream);
  }
  MLM_CHECK_LAUNCH();
  if (chunk_wg) launch_chunk_wg(P, maps, stream);
  else launch_chunk(P, tcode, stream);
  MLM_CHECK_LAUNCH();
  launch_reduce(P, tcode, stream);
  MLM_CHECK_LAUNCH();
  return finish();
}

}  // namespace
}  // namespace ssd_bwd
}  // namespace mlmamba

TORCH_LIBRARY_IMPL(mlmamba, CUDA, m) {
  m.impl("ssd_scan_bwd", &mlmamba::ssd_bwd::ssd_scan_bwd_cuda);
}
