// SSD backward, step 1: the states entering each chunk (forward direction) and the adjoint
// arriving at each chunk's end from later chunks (backward direction), for one 64x64 tile of
// the (p, n) state per block. The tile is carried in fp32 mma accumulators across the chunks
// of one sequence; each chunk adds its own contribution with one tensor-core product:
//   forward:  S <- cont * S + sum_j sout_j dt_j x_j B_j^T      (S_prev stored before the update)
//   backward: G <- cont * G + sum_i sin_i dy_i C_i^T           (G_next stored before the update)
// The backward direction ends with dinitial_states = G.
// Async path (bf16 inputs with 16-byte aligned rows): by cp.async kStages - 1 chunks ahead,
// each thread stages its own raw 16-byte words of the x / dy (and z) tile and the chunk scales
// vectors_kernel computed beforehand, and the B / C tile lands as the mma operand itself (it
// needs no conversion): no serial per-chunk work, two barriers per chunk. Otherwise the
// next chunk's tiles are prefetched into registers (one chunk ahead) and warp 0 computes the
// chunk's scales between barriers.
#include <cuda_runtime.h>

#include <type_traits>

#include "common/launch.h"
#include "ssd/bwd_common.cuh"

namespace mlmamba {
namespace ssd_bwd {

// chunk offsets of the packed sequences: offs[s+1] = offs[s] + ceil(len_s / kQ)
__global__ void chunk_offsets_kernel(Params P) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int acc = 0;
  P.offs[0] = 0;
  for (int s = 0; s < P.nseq; ++s) {
    const int len = P.cu[(s + 1) * P.cu_s] - P.cu[s * P.cu_s];
    acc += len > 0 ? (len + kQ - 1) / kQ : 0;
    P.offs[s + 1] = acc;
  }
}

// Chunk scales of the async path, one warp per (slot, head): the same chunk_vectors_from as
// the register path, so the same values; the walk then has no serial per-chunk work. Where
// P.hrec is set, also the whole record of the sm_90a chunk kernel (HeadRec).
__global__ void __launch_bounds__(128) vectors_kernel(Params P) {
  __shared__ ChunkVec cvw[4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hh = blockIdx.z * 4 + warp;
  const ChunkPos c = chunk_pos_at(P, blockIdx.x, blockIdx.y);
  if (!c.valid || hh >= P.h) return;
  ChunkVec& cv = cvw[warp];
  DtRaw d;
  fetch_dt(P, d, c.bb, c.t0, c.qc, c.first, hh);
  chunk_vectors_from(P, cv, d, c.qc, hh, ld_code(P.A, P.A_code, hh * P.A_s));
  __syncwarp();
  float* out = P.vec + (int64_t(c.slot) * P.h + hh) * kVecW;
  for (int i = lane; i < kQ; i += 32) {
    out[i] = cv.dt[i] * cv.sout[i];
    out[kQ + i] = cv.sin[i];
  }
  if (lane == 0) out[2 * kQ] = cv.cont;
  if (P.hrec) {
    HeadRec* rec = reinterpret_cast<HeadRec*>(static_cast<char*>(P.hrec) +
                                              (int64_t(c.slot) * P.h + hh) * kHeadRecB);
    const uint32_t* src = reinterpret_cast<const uint32_t*>(&cv);
    uint32_t* dst = reinterpret_cast<uint32_t*>(&rec->cv);
    for (int i = lane; i < int(sizeof(ChunkVec) / 4); i += 32) dst[i] = src[i];
    for (int i = lane; i < kQ; i += 32)
      rec->D[i] = P.has_D && i < P.p ? ld_code(P.D, P.D_code, hh * P.D_sh + i * P.D_sp) : 0.f;
    if (lane == 0) rec->A = ld_code(P.A, P.A_code, hh * P.A_s);
  }
}

// Async path, dynamic shared memory per stage: 512 16-byte words for each raw tile that is
// converted (x or dy; z where the adjoint gates dy); the B or C tile, which needs no
// conversion (bf16 inputs), as the padded mma operand itself; 5 floats per thread (its 4
// rows' scales and the chunk's decay).
constexpr int kLdY = kNB + 8;
size_t states_stage_bytes(const Params& P, int stages) {
  return size_t(stages) * ((P.has_z ? 2 : 1) * 512 * 16 + kQ * kLdY * 2 + 5 * 128 * 4);
}

// kStages 0: the register path; 2 or 3: the async path with kStages - 1 chunks in flight while
// one is multiplied (2 stages leave room for 4 CTAs per SM, 3 stages for 3)
template <typename T, int kStages>
__global__ void __launch_bounds__(128, kStages == 3 ? 3 : (sizeof(T) == 4 ? 2 : 4))
    states_kernel(Params P) {
  constexpr bool kAsync = kStages > 0;
  constexpr int kS = kAsync ? kStages : 1;
  static_assert(!kAsync || std::is_same<T, bf16>::value, "the async path takes bf16 rows");
  extern __shared__ uint4 stage[];  // async: [stage][tile][u][thread], then the scale words
  __shared__ ChunkVec cv;           // register path
  __shared__ __align__(16) bf16 Xs[kQ * (kNB + 8)];  // [t][p] scaled input (x or dy)
  __shared__ __align__(16) bf16 Ys[kAsync ? 8 : kQ * (kNB + 8)];  // [t][n] B or C (sync)
  constexpr int LD = kNB + 8;
  const int dir = blockIdx.x & 1;  // 0: states, 1: adjoint
  const int s = blockIdx.x >> 1;
  const int hh = blockIdx.y;
  const int ntn = P.npad / kNB;
  const int p0 = (blockIdx.z / ntn) * 64, n0 = (blockIdx.z % ntn) * kNB;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = lane >> 2, c2 = 2 * (lane & 3);
  const int gg = hh / P.hpg;

  int bb, nk, slot0;
  int64_t tbeg, tend;
  if (P.varlen) {
    bb = 0;
    tbeg = P.cu[s * P.cu_s];
    tend = P.cu[(s + 1) * P.cu_s];
    slot0 = P.offs[s];
    nk = P.offs[s + 1] - slot0;
  } else {
    bb = s;
    tbeg = 0;
    tend = P.l;
    slot0 = s * P.nch;
    nk = P.nch;
  }
  const float Ah = ld_code(P.A, P.A_code, hh * P.A_s);
  const int prow = p0 + warp * 16;  // first state row of this warp
  const bool warp_on = prow < P.p;

  // the carried tile, starting from initial_states (forward) or dfinal_states (backward)
  float acc[8][4];
  {
    const CarriedSrc c0 = carried_src(P, dir);
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int pp = prow + r + (e >> 1) * 8, nn = n0 + t * 8 + c2 + (e & 1);
        acc[t][e] = (c0.has && pp < P.p && nn < P.n) ? c0.at(s, hh, pp, nn) : 0.f;
      }
  }

  bf16* ws = static_cast<bf16*>(dir == 0 ? P.wsS : P.wsG);
  // raw tiles of the next chunk, loaded while the current one is multiplied:
  // thread owns 8-column groups q = tid + 128 k (row q / 8, columns 8 (q % 8) ..)
  Vec8<T> xr[4], zr[4], yr[4];
  DtRaw dr;
  auto fetch = [&](int k) {
    const int64_t t0 = tbeg + int64_t(k) * kQ;
    const int qc = int(min(int64_t(kQ), tend - t0));
    if (warp == 0) fetch_dt(P, dr, bb, t0, qc, k == 0, hh);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int q = tid + 128 * u, i = q >> 3, c8 = (q & 7) * 8;
      const int64_t t = t0 + i;
      const int pc = max(0, min(8, P.p - (p0 + c8))), nc = max(0, min(8, P.n - (n0 + c8)));
      if (i >= qc) {
        xr[u].zero(); zr[u].zero(); yr[u].zero();
        continue;
      }
      if (dir == 0) {
        xr[u].load(P.x, bb * P.x_sb + t * P.x_sl + hh * P.x_sh + (p0 + c8) * P.x_sp, P.x_sp, pc,
                   P.vec_x);
        yr[u].load(P.B, bb * P.B_sb + t * P.B_sl + gg * P.B_sg + (n0 + c8) * P.B_sn, P.B_sn, nc,
                   P.vec_B);
      } else {
        xr[u].load(P.dout, bb * P.o_sb + t * P.o_sl + hh * P.o_sh + (p0 + c8) * P.o_sp, P.o_sp,
                   pc, P.vec_o);
        if (P.has_z)
          zr[u].load(P.z, bb * P.z_sb + t * P.z_sl + hh * P.z_sh + (p0 + c8) * P.z_sp, P.z_sp, pc,
                     P.vec_z);
        yr[u].load(P.C, bb * P.C_sb + t * P.C_sl + gg * P.C_sg + (n0 + c8) * P.C_sn, P.C_sn, nc,
                   P.vec_C);
      }
    }
  };
  // async: chunk of walk step `it` (none past the end: an empty group keeps the count)
  const int nraw = P.has_z ? 2 : 1;  // raw tiles per stage: x or dy (0), z (1)
  auto word = [&](int st, int j, int u) { return stage + ((st * nraw + j) * 4 + u) * 128 + tid; };
  // the stage's B or C operand tile [t][n] (row stride kLdY)
  auto ytile = [&](int st) {
    return reinterpret_cast<bf16*>(stage + kS * nraw * 512) + st * kQ * kLdY;
  };
  // scale words: j < 4 the row of slot j (dt*sout or sin), j = 4 the chunk's decay
  auto scale = [&](int st, int j) {
    return reinterpret_cast<float*>(stage + kS * nraw * 512 + kS * (kQ * kLdY / 8)) +
           (st * 5 + j) * 128 + tid;
  };
  auto issue = [&](int it) {
    if (it < nk) {
      const int k = dir == 0 ? it : nk - 1 - it, st = it % kS;
      const int64_t t0 = tbeg + int64_t(k) * kQ;
      const int qc = int(min(int64_t(kQ), tend - t0));
      const float* vsrc = P.vec + (int64_t(slot0 + k) * P.h + hh) * kVecW;
      cp_async4(scale(st, 4), vsrc + 2 * kQ);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int q = tid + 128 * u, i = q >> 3, c8 = (q & 7) * 8;
        const int64_t t = t0 + i;
        const bool row = i < qc;
        const int pb = row ? 2 * max(0, min(8, P.p - (p0 + c8))) : 0;
        const int nb = row ? 2 * max(0, min(8, P.n - (n0 + c8))) : 0;
        const T* xs = static_cast<const T*>(dir == 0 ? P.x : P.dout);
        const T* ys = static_cast<const T*>(dir == 0 ? P.B : P.C);
        const int64_t xo = dir == 0 ? bb * P.x_sb + t * P.x_sl + hh * P.x_sh + (p0 + c8)
                                    : bb * P.o_sb + t * P.o_sl + hh * P.o_sh + (p0 + c8);
        const int64_t yo = dir == 0 ? bb * P.B_sb + t * P.B_sl + gg * P.B_sg + (n0 + c8)
                                    : bb * P.C_sb + t * P.C_sl + gg * P.C_sg + (n0 + c8);
        cp_async4(scale(st, u), vsrc + dir * kQ + i);
        cp_async16(word(st, 0, u), pb ? xs + xo : xs, pb);
        cp_async16(ytile(st) + i * kLdY + c8, nb ? ys + yo : ys, nb);
        if (dir == 1 && P.has_z) {
          const T* zs = static_cast<const T*>(P.z);
          const int64_t zo = bb * P.z_sb + t * P.z_sl + hh * P.z_sh + (p0 + c8);
          cp_async16(word(st, 1, u), pb ? zs + zo : zs, pb);
        }
      }
    }
    cp_async_commit();
  };
  if constexpr (kAsync) {
    for (int it = 0; it < kS - 1; ++it) issue(it);
  } else {
    if (nk > 0) fetch(dir == 0 ? 0 : nk - 1);
  }

  for (int it = 0; it < nk; ++it) {
    const int k = dir == 0 ? it : nk - 1 - it;
    const int64_t t0 = tbeg + int64_t(k) * kQ;
    const int qc = int(min(int64_t(kQ), tend - t0));
    // async: the chunk kS - 1 steps ahead, into the stage this thread read its words from one
    // step ago (each thread reads back only its own words), so a full step hides the latency
    if constexpr (kAsync) issue(it + kS - 1);

    // store the tile as this chunk's S_prev / G_next
    if (warp_on) {
      bf16* dst = ws + ((int64_t(slot0 + k) * P.h + hh) * P.p) * P.npad;
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int pp = prow + r + hf * 8, nn = n0 + t * 8 + c2;
          if (pp < P.p)
            *reinterpret_cast<__nv_bfloat162*>(dst + int64_t(pp) * P.npad + nn) =
                __floats2bfloat162_rn(acc[t][2 * hf], acc[t][2 * hf + 1]);
        }
    }
    if constexpr (kAsync) {
      cp_async_wait<kS - 1>();  // this thread's words of step it
    } else {
      if (warp == 0) chunk_vectors_from(P, cv, dr, qc, hh, Ah);
      __syncthreads();
    }

    // operand tiles: Xs[t][p] = scaled x (or dy), Ys[t][n] = B (or C)
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int q = tid + 128 * u, i = q >> 3, c8 = (q & 7) * 8;
      const bool row_ok = i < qc;
      if constexpr (kAsync) {  // x only (B/C landed as the operand): this thread's own words
        const int st = it % kS;
        const float sc = *scale(st, u);
        Vec8<T> xw;
        memcpy(xw.e, word(st, 0, u), 16);
        float xv[8];
        if (dir == 1 && P.has_z) {
          Vec8<T> zw;
          memcpy(zw.e, word(st, 1, u), 16);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const bool pok = row_ok && p0 + c8 + e < P.p;
            xv[e] = (pok ? xw.get(e) * silu_f(zw.get(e)) : 0.f) * sc;
          }
        } else if (row_ok && p0 + c8 + 8 <= P.p) {  // the whole 8-column group
#pragma unroll
          for (int e = 0; e < 8; ++e) xv[e] = xw.get(e) * sc;
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) xv[e] = (row_ok && p0 + c8 + e < P.p ? xw.get(e) : 0.f) * sc;
        }
        st_bf16x8(Xs + i * LD + c8, xv);
      } else {
        const float sc = dir == 0 ? cv.dt[i] * cv.sout[i] : cv.sin[i];
        float xv[8], yv[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const bool pok = row_ok && p0 + c8 + e < P.p, nok = row_ok && n0 + c8 + e < P.n;
          float v = pok ? xr[u].get(e) : 0.f;
          if (dir == 1 && P.has_z && pok) v *= silu_f(zr[u].get(e));
          xv[e] = v * sc;
          yv[e] = nok ? yr[u].get(e) : 0.f;
        }
        st_bf16x8(Xs + i * LD + c8, xv);
        st_bf16x8(Ys + i * LD + c8, yv);
      }
    }
    __syncthreads();
    if constexpr (!kAsync)
      if (it + 1 < nk) fetch(dir == 0 ? k + 1 : k - 1);

    const float cont = kAsync ? *scale(it % kS, 4) : cv.cont;
    if (warp_on) {
#pragma unroll
      for (int t = 0; t < 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] *= cont;
#pragma unroll
      for (int kk = 0; kk < kQ / 16; ++kk) {
        uint32_t a[4];
        frag_a_t(a, Xs, LD, warp * 16, kk * 16);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          uint32_t b0, b1;
          frag_b_kn(b0, b1, kAsync ? ytile(it % kS) : Ys, LD, t * 8, kk * 16);
          mma_bf16(acc[t], a, b0, b1);
        }
      }
    }
    __syncthreads();
  }

  if (dir == 1 && P.has_init && warp_on) {
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int pp = prow + r + (e >> 1) * 8, nn = n0 + t * 8 + c2 + (e & 1);
        if (pp < P.p && nn < P.n)
          st_code(P.dinit, P.init_code, ((int64_t(s) * P.h + hh) * P.p + pp) * P.n + nn,
                  acc[t][e]);
      }
  }
}

void launch_chunk_offsets(const Params& prm, void* stream) {
  chunk_offsets_kernel<<<1, 32, 0, static_cast<cudaStream_t>(stream)>>>(prm);
}

bool states_async_ok(const Params& P, int tcode) {
  return tcode == kBF16 && P.vec_x && P.vec_o && P.vec_B && P.vec_C && (!P.has_z || P.vec_z);
}

void launch_vectors(const Params& prm, void* stream) {
  const dim3 grid(prm.varlen ? prm.nslots : prm.nch, prm.varlen ? 1 : prm.b, (prm.h + 3) / 4);
  if (grid.x == 0 || grid.y == 0) return;
  vectors_kernel<<<grid, 128, 0, static_cast<cudaStream_t>(stream)>>>(prm);
}

void launch_states(const Params& prm, int tcode, int stages, void* stream) {
  dim3 grid(prm.nseq * 2, prm.h, ((prm.p + 63) / 64) * (prm.npad / kNB));
  auto st = static_cast<cudaStream_t>(stream);
  if (stages > 0) {
    const size_t smem = states_stage_bytes(prm, stages);
    auto kern = stages == 2 ? states_kernel<bf16, 2> : states_kernel<bf16, 3>;
    ensure_max_dynamic_smem(reinterpret_cast<const void*>(kern), static_cast<int>(smem));
    kern<<<grid, 128, smem, st>>>(prm);
  } else if (tcode == kF32) {
    states_kernel<float, 0><<<grid, 128, 0, st>>>(prm);
  } else if (tcode == kF16) {
    states_kernel<__half, 0><<<grid, 128, 0, st>>>(prm);
  } else {
    states_kernel<bf16, 0><<<grid, 128, 0, st>>>(prm);
  }
}

}  // namespace ssd_bwd
}  // namespace mlmamba
