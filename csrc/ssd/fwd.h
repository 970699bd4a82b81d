// SSD forward and decode step: the plain parameter structs shared by host glue and kernels.
// Pointers plus element strides (64-bit); A, D and dt_bias arrive as contiguous float32.
#pragma once
#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstdint>

namespace mlmamba {
namespace ssd {

// The fused multi-order 2D scan (msc_scan, csrc/msc/ops.cpp) on the wgmma kernel: per scan s,
// rows are read and written through orders[s]; x is the causal conv (width 4, SiLU) of the
// raster rows of xBC along that order, computed in the kernel's chunk load (x of FwdParams
// points into xBC); B and C point to the per-scan conv'd B, C in scan order (bc_s apart; the
// warp-specialized kernel loads them by TMA through tm_B / tm_C over (b, l, nscans g, n));
// A, D, dt_bias hold (nscans, h) fp32.
struct MscParams {
  int nscans;                 // 0: a plain ssd_scan launch
  const int* orders;          // (nscans, seqlen) int32: raster position of each scan token
  const float* conv_w;        // (nscans, conv_dim, 4) fp32
  const float* conv_b;        // (nscans, conv_dim) fp32, or nullptr
  int64_t conv_dim;           // channels of an xBC row: h p + 2 g n (x, B, C in that order)
  float* acc;                 // fp32 (b, l, h, p) running sum over scans (merge sum / mean, nscans > 1)
  int merge;                  // 0: per-scan outputs, out (nscans, b, l, h, p); 1 sum; 2 mean
  int64_t out_s;              // scan stride of out (merge 0)
  int64_t bc_s;               // scan stride of B and C
  int prefetch;               // acc rows to L2: 0 no, 1 at their chunk's top, 2 a chunk ahead
  // warp-specialized kernel: store each chunk's conv'd X tile by TMA through tm_x, a map of
  // (b, l, nscans h, p) in scan order (the backward's saved x, the scans side by side as one
  // SSD of nscans h heads; the MSC mode loads no x by TMA)
  bool save_x;
  // ... and each chunk's entry state (bf16, as WG0 hands it to WG1) through tm_S, a map of
  // (b nchunks nscans h, p, 1, n) with 64 x 16 boxes: the S_prev workspace of that SSD's
  // backward
  bool save_states;
  // warp-specialized kernel, merge 0 only: one CTA per (row, head, scan) instead of per (row,
  // head) running the k scans one after another (without a merge the scans are independent;
  // k times the CTAs: the connector at batch 1 fills k times the SMs)
  bool split;
};

struct FwdParams {
  int64_t seqlen, nheads, headdim, ngroups;
  int64_t nrows;              // batch, or the number of packed sequences with cu_seqlens
  int heads_per_group;
  const void* x;
  const void* dt;
  const float* A;
  const void* B;
  const void* C;
  const float* D;             // nullptr, or (h) / (h, p) via D_h, D_p
  const void* z;              // nullptr or (b, l, h, p)
  const float* dt_bias;       // nullptr or (h)
  const void* init;           // nullptr or (rows, h, p, n)
  const int* seq_idx;         // nullptr or (b, l)
  const int* cu_seqlens;      // nullptr or (nrows + 1)
  void* out;                  // (b, l, h, p) in x's dtype
  float* final_states;        // nullptr or (rows, h, p, n) contiguous
  int64_t x_b, x_l, x_h, x_p;
  int64_t dt_b, dt_l, dt_h;
  int64_t B_b, B_l, B_g, B_n;
  int64_t C_b, C_l, C_g, C_n;
  int64_t z_b, z_l, z_h, z_p;
  int64_t out_b, out_l, out_h, out_p;
  int64_t init_b, init_h, init_p, init_n;
  int64_t seq_b, seq_l;
  int64_t D_h, D_p;
  int dt_dtype, z_dtype, init_dtype;  // DType codes (common.cuh)
  bool dt_softplus, has_dt_limit;
  float dt_min, dt_max;
  bool vec_loads;             // x, B, C rows are 16-byte aligned and contiguous in p / n
  bool one_cta_regs;          // dstate 128: registers budgeted for 1 CTA per SM (no spills)
  // sequence split (wgmma kernel, fwd_split.cpp): row r is segment r % seg_rows of batch row
  // r / seg_rows, tokens [seg * seg_len, + seg_len); seg_len 0: no split
  int64_t seg_len, seg_rows;
  // state-only walk (the split's step 1): where set, the product of the walk's chunk decays
  // (in chunk order) per (row, head), for step 2
  float* seg_decay;
  MscParams msc;
  // sm_90 wgmma kernel: tiles of x, B, C by TMA (fwd_ops.cpp builds the maps: 4-D, columns /
  // tokens / head or group / batch, 64 x 64 boxes, 128-byte swizzle, zeros past the sequence)
  // instead of cp.async; not with cu_seqlens (a box would run into the next sequence)
  bool tma;
  CUtensorMap tm_x, tm_B, tm_C;  // 64-byte aligned by their type
  CUtensorMap tm_S;              // MSC: the saved chunk-entry states (MscParams::save_states)
  // sm_90 wgmma kernel, not MSC, not cu_seqlens: scratch for the chunk-vector pre-pass
  // (vec_cap bytes; nullptr: warp 0 computes each chunk's vectors in the walk). The launch
  // fills it (rows, heads, vec_nch chunks of kFwdVecBytes) and sets vecs; the walk then loads
  // a chunk's vectors with its tiles.
  unsigned char* vec_buf;
  int64_t vec_cap, vec_nch;
  const unsigned char* vecs;
};

// bytes of one chunk's vectors (fwd_vectors.cuh, kVecBytes)
constexpr int kFwdVecBytes = 5 * 64 * 4 + 16;

// Launch the chunked scan forward for x/B/C of one dtype; pt (32 or 64) head channels per CTA.
// Return false for a d_state without a kernel.
bool launch_ssd_fwd_bf16(const FwdParams& p, int dstate, int pt, cudaStream_t stream);
bool launch_ssd_fwd_f16(const FwdParams& p, int dstate, int pt, cudaStream_t stream);
bool launch_ssd_fwd_f32(const FwdParams& p, int dstate, int pt, cudaStream_t stream);
// sm_90a wgmma kernel (fwd_wgmma.cu): bf16, headdim 64, dstate 64 or 128. Returns nullptr
// when launched, else why it cannot run these inputs (nothing launched). state_only: final
// states alone (no C, no outputs), kFwdStateOnlyPerSm CTAs per SM.
constexpr int kFwdStateOnlyPerSm = 4;
const char* launch_ssd_fwd_wgmma(const FwdParams& p, int dstate, cudaStream_t stream,
                                 bool state_only = false);

// The chunk-vector pre-pass of the wgmma kernels (fwd_wgmma.cu): fills p.vec_buf for this
// launch's rows where it applies and fits and returns p with vecs set (else vecs nullptr).
FwdParams ssd_fwd_vectors(const FwdParams& p, cudaStream_t stream);
// Warp-specialized variant (fwd_ws.cu; opt-in MLMAMBA_SSD_FWD_IMPL=ws): needs TMA maps and the
// pre-pass buffer. nullptr when launched, else why it cannot run these inputs.
const char* launch_ssd_fwd_ws(const FwdParams& p, int dstate, cudaStream_t stream);

// msc_scan forward (fused conv, orders, merge): the wgmma kernel's MSC mode; x/B/C/dt/out
// strides as for ssd_scan with rows = raster positions. nullptr when launched, else why not.
const char* launch_msc_fwd_wgmma(const FwdParams& p, int dstate, cudaStream_t stream);
// The same on the warp-specialized kernel (fwd_ws_msc.cu; the default, MLMAMBA_MSC_WS=0 for
// the one above): needs the chunk-vector pre-pass buffer (p.vec_buf) and the TMA maps tm_B /
// tm_C of the conv'd B and C (p.tma).
const char* launch_msc_fwd_ws(const FwdParams& p, int dstate, cudaStream_t stream);

// Dynamic shared memory of one CTA (bytes); mirrors FwdTraits::SMEM (fwd_kernel.cuh).
constexpr int ssd_fwd_smem_bytes(bool bf16_inputs, int dstate, int pt) {
  const int q = 64, nbuf = bf16_inputs ? 2 : 1, nspl = bf16_inputs ? 1 : 2;
  const int load_el = q * pt + 2 * q * dstate;
  return (nbuf * nspl * load_el + nspl * (pt * dstate + q * q)) * 2 + 2 * (5 * q * 4 + 16) + 64 * 4;
}

struct UpdateParams {
  int64_t batch, nheads, headdim, dstate;
  int heads_per_group;
  void* state;                // (b, h, p, n), n contiguous, rows 16-byte aligned
  const void* x;
  const void* dt;
  const float* A;
  const void* B;
  const void* C;
  const float* D;
  const void* z;
  const float* dt_bias;
  void* out;                  // (b, h, p) contiguous, x's dtype
  int64_t s_b, s_h, s_p;
  int64_t x_b, x_h, x_p;
  int64_t dt_b, dt_h;
  int64_t B_b, B_g, B_n;
  int64_t C_b, C_g, C_n;
  int64_t z_b, z_h, z_p;
  int64_t D_h, D_p;
  int x_dtype, dt_dtype, bc_dtype, z_dtype;
  bool dt_softplus;
  bool bc_vec;                // B and C contiguous in n, rows 16-byte aligned
};

// Return false for a d_state without a kernel.
bool launch_ssd_update(const UpdateParams& p, bool bf16_state, cudaStream_t stream);

}  // namespace ssd
}  // namespace mlmamba
