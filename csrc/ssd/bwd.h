// SSD chunked scan backward: parameters shared by the host glue (bwd_ops.cpp) and the kernels.
//
// Three steps (docs/perf-log.md "ssd_scan backward" has the plan and the numbers):
//   1. bwd_states.cu  per (sequence, head, direction, 64x64 state tile): walks the chunks in
//      order carrying the state S (forward) or the adjoint G (backward) in fp32 registers and
//      stores each chunk's incoming S_prev / G_next as bf16 (the chunk products' operand type).
//      On sm_90a bwd_states_wg.cu where it applies (wgmma + TMA).
//   2. bwd_chunk.cuh  per (chunk, batch, group, head split): every gradient of the chunk, with
//      dB/dC summed over the split's heads in a fixed order (on chip where it fits) and
//      written once per block into an fp32 workspace. On sm_90a bwd_chunk_wg.cu where it
//      applies (wgmma; dB/dC summed in registers).
//   3. bwd_reduce.cu  fixed-order sums over head splits (dB, dC) and chunks (dA, dD, ddt_bias).
// Chunks are kQ = 64 steps whatever chunk_size says (the result does not depend on it); with
// cu_seqlens, chunks restart at every sequence start, so each chunk belongs to one sequence.
#pragma once
#include <cuda.h>  // CUtensorMap

#include <cstddef>
#include <cstdint>

namespace mlmamba {
namespace ssd_bwd {

constexpr int kQ = 64;          // chunk length
constexpr int kNB = 64;         // state columns (n) per block
// dt*A is clamped here where the backward takes differences of its in-chunk cumsum (the
// decay mask L, sout): fp32 differences of large cumsums lose the exponent's precision.
// exp(-60) ~ 1e-26. The exponentials of plain cumsums (sin, cont) take the unclamped value.
constexpr float kMinLogDecay = -60.f;
// per (slot, head): dt*sout (64), sin (64), cont, padding to a 16-byte multiple
constexpr int kVecW = 2 * 64 + 4;
// per (slot, head) record of the sm_90a chunk kernel's inputs (HeadRec, bwd_common.cuh: the
// chunk vectors, D, A), written by vectors_kernel and loaded with the head's tiles
constexpr int kHeadRecB = 1808;

// dtype codes for tensors read or written through a runtime switch (small tensors)
enum DCode : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct Params {
  // sizes
  int b, l, h, p, g, n, npad, hpg;   // npad: n rounded up to a multiple of kNB
  int nseq;                          // sequences: b, or cu_seqlens.numel() - 1
  int nch;                           // chunks per batch row (no cu_seqlens)
  int nslots;                        // chunk slots (upper bound with cu_seqlens)
  int nsplit, hsplit;                // head splits per group, heads per split
  bool varlen, has_seq_idx, has_z, has_D, D_per_p, has_dt_bias, has_init, has_dfinal;
  bool softplus, clamp;
  bool vec_x, vec_o, vec_z, vec_B, vec_C;  // rows contiguous and 16-byte aligned: vector loads
  int ctas_per_sm;                          // resident step-2 blocks per SM (sizing head splits)
  bool onchip;  // step 2 keeps the dB/dC partials in shared memory across heads (bwd_chunk.cuh)
  bool g_only;  // wsS holds the caller's chunk_states: the sm_90a walk runs the adjoint alone
  float dt_min, dt_max;

  // inputs (element strides, 64-bit)
  const void* x;    int64_t x_sb, x_sl, x_sh, x_sp;     // dtype T
  const void* dout; int64_t o_sb, o_sl, o_sh, o_sp;     // dtype T
  const void* z;    int64_t z_sb, z_sl, z_sh, z_sp;     // dtype T
  const void* B;    int64_t B_sb, B_sl, B_sg, B_sn;     // dtype T
  const void* C;    int64_t C_sb, C_sl, C_sg, C_sn;     // dtype T
  const void* dt;   int dt_code; int64_t dt_sb, dt_sl, dt_sh;
  const void* A;    int A_code;  int64_t A_s;
  const void* D;    int D_code;  int64_t D_sh, D_sp;
  const void* dt_bias; int dtb_code; int64_t dtb_s;
  const void* init;   int init_code;   int64_t i_ss, i_sh, i_sp, i_sn;
  const void* dfinal; int dfinal_code; int64_t f_ss, f_sh, f_sp, f_sn;
  const int* seq_idx; int64_t si_sb, si_sl;
  const int* cu; int64_t cu_s;
  int* offs;                         // (nseq+1) chunk offsets per sequence (cu_seqlens only)

  // workspaces
  void* wsS;      // (nslots, h, p, npad) bf16: state entering each chunk
  void* wsG;      // (nslots, h, p, npad) bf16: adjoint leaving each chunk (from later chunks)
  float* wsdB;    // (b, l, nsplit, g, npad): per-split partial sums (none: onchip, nsplit 1)
  float* wsdC;
  float* part_dA;    // (nslots, h)
  float* part_ddtb;  // (nslots, h)
  float* part_dD;    // (nslots, h, p)
  float* vec;        // (nslots, h, kVecW): step 1's chunk scales (async path; vectors_kernel)
  void* hrec;        // (nslots, h) x kHeadRecB bytes, or null: bwd_chunk_wg.cu's HeadRec

  // outputs (contiguous)
  void* dx;       // (b,l,h,p) T
  void* dz;       // (b,l,h,p) T
  void* ddt;      // (b,l,h) dt_code
  void* dinit;    // (nseq,h,p,n) init_code
  void* dB;       // (b,l,g,n) T
  void* dC;       // (b,l,g,n) T
  float* dA;      // (h)
  float* ddtb;    // (h)
  float* dD;      // (h) or (h,p)
};

// Launchers (stream = the current CUDA stream). T: 0 fp32, 1 fp16, 2 bf16 for x/dout/z/B/C.
void launch_chunk_offsets(const Params& prm, void* stream);
// step 1 by cp.async staging in `stages` (2 or 3) where it applies (bf16 inputs, 16-byte
// aligned rows), else (stages 0) with a one-chunk register prefetch
bool states_async_ok(const Params& prm, int tcode);
void launch_states(const Params& prm, int tcode, int stages, void* stream);
// the async path's chunk scales, before launch_states
void launch_vectors(const Params& prm, void* stream);
// The inputs both sm_90a kernels take (bwd_states_wg.cu, bwd_chunk_wg.cu): bf16, headdim 64,
// d_state 64 or 128, no cu_seqlens
inline bool wg_shape_ok(const Params& P, int tcode) {
  return tcode == kBF16 && P.p == 64 && (P.npad == 64 || P.npad == 128) && P.n == P.npad &&
         !P.varlen;
}
// step 1 on sm_90a wgmma (bwd_states_wg.cu; the default there): TMA maps of
// x, dout, z, B, C ((b, l, j, cols) as ssd::encode_tile_map makes them), after launch_vectors
// and of the state workspaces wsS / wsG as (nslots h, p, 1, npad)
struct StatesMaps {
  CUtensorMap x, o, z, B, C, wsS, wsG;
};
bool states_wg_ok(const Params& prm, int tcode);
// false where it cannot run (no sm_90a image, shared memory): then launch_states
bool launch_states_wg(const Params& prm, const StatesMaps& maps, int num_sms, void* stream);
// step 2 on sm_90a wgmma (bwd_chunk_wg.cu; the default there): bf16, headdim 64, d_state 64
// or 128, no z, no cu_seqlens, the sm_90a image and its shared memory; the maps' x, o, B, C,
// wsS, wsG as for step 1. It writes dB / dC itself with one split (as prm.onchip)
bool chunk_wg_ok(const Params& prm, int tcode);
void launch_chunk_wg(const Params& prm, const StatesMaps& maps, void* stream);
void launch_chunk(const Params& prm, int tcode, void* stream);
void launch_reduce(const Params& prm, int tcode, void* stream);
size_t chunk_smem_bytes(const Params& prm);       // step 2's dynamic shared memory (prm.onchip)
bool chunk_onchip_fits(const Params& prm, size_t optin);  // the on-chip variant fits (prm.p, npad)
int chunk_groups(const Params& prm);               // 8-warp groups per step-2 block

}  // namespace ssd_bwd
}  // namespace mlmamba
