// The wgmma forward with the sequence split into segments (docs/perf-log.md, ssd_scan forward
// v6): b * h CTAs walking long sequences leave SMs idle (b1 L16384 h80: 80 CTAs on 132 SMs).
// Split each sequence into nseg segments of whole chunks and run three steps:
//   1. every segment but the last, state only, from a zero state, in m sub-segments each (more
//      CTAs, shorter walks; pick_subsegments): E_k (fp32, per head)
//   2. S_0 = initial state (or 0), S_{k+1} = exp(sum over sub-segment k of dt A) S_k + E_k;
//      a segment's incoming state is S at its first sub-segment (one launch: the decays come
//      from step 1's walk over the chunk vectors, fwd_split_states.cu; torch ops without the
//      pre-pass)
//   3. every segment, the full kernel (warp-specialized where it can run) from its S_s: outputs,
//      and the final state of the last
// (linear in the state: the segment's own contribution plus the decayed incoming state).
// The chunk-vector pre-pass runs once, before step 1, for the whole sequence: steps 1-3 read it.
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

// Sub-segments per segment for step 1: its state-only pass over the first nseg - 1 segments
// runs on (rows * heads * (nseg - 1) * m) CTAs of ceil(seg_chunks / m) chunks, at
// kFwdStateOnlyPerSm per SM (b1 L16384 h80: 160 CTAs of 86 chunks -> 480 of 29, one wave of
// 528 slots). Cost: waves x (chunks + 2).
int pick_subsegments(int64_t rows, int64_t heads, int64_t seg_chunks, int nseg,
                     const cudaDeviceProp& prop) {
  const char* e = std::getenv("MLMAMBA_SSD_FWD_SUBSEG");  // developer override (tests)
  if (e && *e) return std::max(1, std::atoi(e));
  const int64_t slots = kFwdStateOnlyPerSm * static_cast<int64_t>(prop.multiProcessorCount);
  auto cost = [&](int64_t m) {
    const int64_t ctas = rows * heads * (nseg - 1) * m;
    return ((ctas + slots - 1) / slots) * ((seg_chunks + m - 1) / m + 2);
  };
  int best = 1;
  for (int m = 2; m <= 8 && m <= seg_chunks; ++m)
    if (rows * (nseg - 1) * m <= 65535 && cost(m) < cost(best)) best = m;
  return best;
}

const char* ssd_fwd_wgmma_split(FwdParams prm, int dstate, int nseg, const at::Tensor& dt,
                                const at::Tensor& A, const std::optional<at::Tensor>& dt_bias,
                                const std::optional<at::Tensor>& init, bool dt_softplus,
                                double dt_min, double dt_max, const at::Tensor& final_states,
                                bool vectors, bool ws, cudaStream_t stream) {
  const int64_t b = prm.nrows, h = prm.nheads, p = prm.headdim, n = dstate, l = prm.seqlen;
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  const int64_t chunks = (l + 63) / 64;
  // step 1's sub-segments: m per segment, sub_len tokens each; a segment is m sub-segments
  const int m = pick_subsegments(b, h, (chunks + nseg - 1) / nseg, nseg, prop);
  const int64_t sub_len = ((chunks + nseg - 1) / nseg + m - 1) / m * 64;
  const int64_t seg_len = sub_len * m;
  nseg = static_cast<int>((l + seg_len - 1) / seg_len);  // no empty trailing segment
  if (nseg < 2) return "fewer than two segments";
  if (b * nseg > 65535 || b * (nseg - 1) * m > 65535) return "more than 65535 (row, segment) pairs";
  const int nsub = (nseg - 1) * m;  // sub-segments of step 1: all full length
  const auto f32 = dt.options().dtype(at::kFloat);

  // step 3's rows: every segment
  FwdParams s3 = prm;
  s3.seg_len = seg_len;
  s3.seg_rows = nseg;
  s3.nrows = b * nseg;
  // the chunk-vector pre-pass (fwd_wgmma.cu) where the caller asked for it, once for the
  // whole sequence (its buffer is laid out by sequence chunk: wg::vec_index); the launches
  // below find vecs set and skip their own
  at::Tensor vec_buf;
  if (vectors) {
    vec_buf = attach_vec_buf(s3, b * nseg, seg_len / 64, dt.options());
    const FwdParams v = ssd_fwd_vectors(s3, stream);
    s3.vecs = v.vecs;
    s3.vec_nch = v.vec_nch;
  }

  // 1. sub-segment end states from zero, every sub-segment before the last segment, and
  // (with the pre-pass) their decays: the products of their chunk decays, in chunk order
  at::Tensor E = at::empty({b * nsub, h, p, n}, f32);
  at::Tensor decay;
  FwdParams s1 = s3;
  s1.seg_len = sub_len;
  s1.seg_rows = nsub;
  s1.nrows = b * nsub;
  s1.init = nullptr;
  s1.final_states = E.data_ptr<float>();
  if (s3.vecs) {
    decay = at::empty({b * nsub, h}, f32);
    s1.seg_decay = decay.data_ptr<float>();
  }
  if (const char* why = launch_ssd_fwd_wgmma(s1, dstate, stream, /*state_only=*/true)) return why;

  // 2. incoming states: S_{k+1} = decay_k S_k + E_k over the sub-segments
  at::Tensor S = at::empty({b, nseg, h, p, n}, f32);
  if (init) S.select(1, 0).copy_(*init);
  else if (!s3.vecs) S.select(1, 0).zero_();  // (the kernel below writes the zeros itself)
  if (s3.vecs) {  // with the walk's decays, in one launch
    split_combine_states(E.data_ptr<float>(), decay.data_ptr<float>(), S.data_ptr<float>(), b, h,
                         p * n, nsub, m, !init, stream);
  } else {  // the kernel's dt (bias, softplus, limit) summed per sub-segment, times A
    at::Tensor d = dt.to(at::kFloat);
    if (dt_bias) d = d + dt_bias->to(at::kFloat);
    if (dt_softplus) d = at::softplus(d, 1, 20);
    if (prm.has_dt_limit) d = d.clamp(dt_min, dt_max);
    d = at::constant_pad_nd(d, {0, 0, 0, nseg * seg_len - l});  // (b, nseg * seg_len, h)
    // reshape: with no bias, softplus, limit or padding, d can still be the caller's strided dt
    const at::Tensor sub_decay =
        (d.reshape({b, nseg * m, sub_len, h}).sum(2) * A.to(at::kFloat)).exp();
    const at::Tensor Ev = E.view({b, nsub, h, p, n});
    at::Tensor cur = S.select(1, 0).clone();
    for (int k = 0; k < nsub; ++k) {
      at::Tensor next = (k + 1) % m == 0 ? S.select(1, (k + 1) / m) : at::empty_like(cur);
      at::addcmul_out(next, Ev.select(1, k), sub_decay.select(1, k).view({b, h, 1, 1}), cur);
      cur = next;
    }
  }

  // 3. every segment from its incoming state
  at::Tensor fin;
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
