// The wgmma forward with the sequence split into segments (docs/perf-log.md, ssd_scan forward
// v6): b * h CTAs walking long sequences leave SMs idle (b1 L16384 h80: 80 CTAs on 132 SMs).
// Split each sequence into nseg segments of whole chunks and run three steps:
//   1. every segment but the last, state only, from a zero state: E_s (fp32, per head)
//   2. S_0 = initial state (or 0), S_{s+1} = exp(sum over segment s of dt A) S_s + E_s
//   3. every segment, the full kernel (warp-specialized where it can run) from its S_s: outputs,
//      and the final state of the last
// (linear in the state: the segment's own contribution plus the decayed incoming state).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdlib>
#include <optional>

#include "common/check.h"
#include "ssd/fwd_split.h"
#include "ssd/host.h"

namespace mlmamba {
namespace ssd {

int pick_segments(int64_t rows, int64_t heads, int64_t seqlen, const cudaDeviceProp& prop) {
  if (const char* e = std::getenv("MLMAMBA_SSD_FWD_SEGMENTS"))  // developer override (tests)
    return std::max(1, std::atoi(e));
  // Measured (H200, docs/perf-log.md v6): b1 L16384 h80 (80 CTAs on 132 SMs) 898 -> 618 µs
  // with 3 segments; b4 L2048 h80 (320 CTAs) 289 -> 441 µs, slower. Split only grids with
  // fewer (row, head) pairs than SMs.
  if (rows * heads >= prop.multiProcessorCount) return 1;
  const int64_t chunks = (seqlen + 63) / 64;
  const int64_t slots = 2 * static_cast<int64_t>(prop.multiProcessorCount);  // 2 CTAs / SM
  auto waves = [&](int64_t units) { return (units + slots - 1) / slots; };
  // time ~ waves x chunks per CTA; the state-only pass costs ~0.35 of a full chunk
  auto cost = [&](int64_t nseg) {
    const int64_t per = (chunks + nseg - 1) / nseg;
    double c = static_cast<double>(waves(rows * heads * nseg) * per);
    if (nseg > 1) c += 0.35 * static_cast<double>(waves(rows * heads * (nseg - 1)) * per) + 2.0;
    return c;
  };
  int best = 1;
  for (int nseg = 2; nseg <= 16 && nseg <= chunks / 4; ++nseg)
    if (rows * nseg <= 65535 && cost(nseg) < 0.9 * cost(best)) best = nseg;
  return best;
}

const char* ssd_fwd_wgmma_split(FwdParams prm, int dstate, int nseg, const at::Tensor& dt,
                                const at::Tensor& A, const std::optional<at::Tensor>& dt_bias,
                                const std::optional<at::Tensor>& init, bool dt_softplus,
                                double dt_min, double dt_max, const at::Tensor& final_states,
                                bool vectors, bool ws, cudaStream_t stream) {
  const int64_t b = prm.nrows, h = prm.nheads, p = prm.headdim, n = dstate, l = prm.seqlen;
  const int64_t seg_len = ((l + 63) / 64 + nseg - 1) / nseg * 64;
  nseg = static_cast<int>((l + seg_len - 1) / seg_len);  // no empty trailing segment
  if (nseg < 2) return "fewer than two segments";
  if (b * nseg > 65535) return "more than 65535 (row, segment) pairs";
  const auto f32 = dt.options().dtype(at::kFloat);

  // the chunk-vector pre-pass (fwd_wgmma.cu) where the caller asked for it: its buffer sized
  // for step 3's rows (whole segments), which also covers step 1's
  at::Tensor vec_buf;
  if (vectors) vec_buf = attach_vec_buf(prm, b * nseg, seg_len / 64, dt.options());

  // 1. segment end states from zero, every segment but the last
  at::Tensor E = at::empty({b * (nseg - 1), h, p, n}, f32);
  FwdParams s1 = prm;
  s1.seg_len = seg_len;
  s1.seg_rows = nseg - 1;
  s1.nrows = b * (nseg - 1);
  s1.init = nullptr;
  s1.final_states = E.data_ptr<float>();
  if (const char* why = launch_ssd_fwd_wgmma(s1, dstate, stream, /*state_only=*/true)) return why;

  // 2. incoming states: the kernel's dt (bias, softplus, limit) summed per segment, times A
  at::Tensor d = dt.to(at::kFloat);
  if (dt_bias) d = d + dt_bias->to(at::kFloat);
  if (dt_softplus) d = at::softplus(d, 1, 20);
  if (prm.has_dt_limit) d = d.clamp(dt_min, dt_max);
  d = at::constant_pad_nd(d, {0, 0, 0, nseg * seg_len - l});  // (b, nseg * seg_len, h)
  // reshape: with no bias, softplus, limit or padding, d can still be the caller's strided dt
  const at::Tensor decay = (d.reshape({b, nseg, seg_len, h}).sum(2) * A.to(at::kFloat)).exp();
  at::Tensor S = at::empty({b, nseg, h, p, n}, f32);
  if (init) S.select(1, 0).copy_(*init);
  else S.select(1, 0).zero_();
  const at::Tensor Ev = E.view({b, nseg - 1, h, p, n});
  for (int s = 0; s + 1 < nseg; ++s) {
    at::Tensor next = S.select(1, s + 1);
    at::addcmul_out(next, Ev.select(1, s), decay.select(1, s).view({b, h, 1, 1}), S.select(1, s));
  }

  // 3. every segment from its incoming state
  at::Tensor fin;
  FwdParams s3 = prm;
  s3.seg_len = seg_len;
  s3.seg_rows = nseg;
  s3.nrows = b * nseg;
  s3.init = S.data_ptr();
  s3.init_dtype = 0;  // DType::f32
  s3.init_b = h * p * n; s3.init_h = p * n; s3.init_p = n; s3.init_n = 1;
  if (prm.final_states) {
    fin = at::empty({b * nseg, h, p, n}, f32);
    s3.final_states = fin.data_ptr<float>();
  }
  if (!(ws && launch_ssd_fwd_ws(s3, dstate, stream) == nullptr))
    if (const char* why = launch_ssd_fwd_wgmma(s3, dstate, stream)) return why;
  if (prm.final_states) final_states.copy_(fin.view({b, nseg, h, p, n}).select(1, nseg - 1));
  return nullptr;
}

}  // namespace ssd
}  // namespace mlmamba
