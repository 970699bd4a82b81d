// msc_scan host helpers (ops.cpp) and kernels of this folder.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mlmamba {
namespace msc {

// B and C of every scan, conv'd (width 4, SiLU) along the scan's order and stored in scan
// order: out (b, L, 2, k, nch / 2) bf16 (B, then C, each scan's g n channels side by side)
// from the nch channels of xBC starting at col0.
struct BcConvParams {
  const __nv_bfloat16* xBC;   // (b, L, conv_dim), rows 16-byte aligned
  int64_t x_b, x_l;
  int64_t col0, conv_dim;
  int nch;                    // 2 g n, a multiple of 8
  int64_t batch, seqlen;
  int nscans;
  const int* orders;          // (k, L) int32
  const float* w;             // (k, conv_dim, 4) fp32
  const float* bias;          // (k, conv_dim) fp32 or nullptr
  __nv_bfloat16* out;         // (b, L, 2, k, nch / 2) contiguous, rows in scan order
};

void launch_bc_conv(const BcConvParams& p, cudaStream_t stream);

// out[b, r, :] = sum over scans i = 0..k-1, in that order, of src_i[b, inv[i, r], :], in fp32,
// rounded once (sum_rows.cu). The backward's per-scan gradients come in scan order; inv maps
// a raster row to its position in scan i. All tensors share one dtype; last dims contiguous.
// Gather mode (msc_gather_rows, ngather scans, nscans 1): blockIdx.y = s reads inv row s and
// src[0] + s src_s, and writes out + s out_s.
constexpr int kMaxSumScans = 8;
struct SumRowsParams {
  const void* src[kMaxSumScans];
  int64_t src_b[kMaxSumScans], src_l[kMaxSumScans];  // element strides
  const int* inv;                                     // (k, L) int32
  void* out;
  int64_t out_b, out_l;
  int64_t batch, seqlen, cols;
  int nscans;
  float scale;  // multiplies the fp32 sum before its rounding
  int ngather = 1;            // gather mode's scans (grid y); 1 for a sum
  int64_t src_s = 0, out_s = 0;  // gather mode: scan strides of src[0] (0: shared) and out
  // gather mode with a shared src: (k, L) int32 workspace set to -1; the kernels then read
  // each source row once and write it to its position in every scan (inv holds the orders)
  int* inv_ws = nullptr;
  const int* rows = nullptr;  // set by the launcher there: the orders
};

// dtype: 0 float32, 1 float16, 2 bfloat16; wide: cols, strides and pointers allow 16-byte
// pieces
void launch_sum_rows(const SumRowsParams& p, int dtype, bool wide, int sms, cudaStream_t stream);

}  // namespace msc
}  // namespace mlmamba
