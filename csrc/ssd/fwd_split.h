// The wgmma forward with the sequence split into segments (fwd_split.cpp). Host only.
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <optional>

#include "ssd/fwd.h"

namespace mlmamba {
namespace ssd {

// The wgmma forward with the sequence split into nseg segments; pick_segments chooses
// nseg (1: no split). Needs no seq_idx, no cu_seqlens; nullptr when it ran. ws: step 3 on the
// warp-specialized kernel where it can run.
int pick_segments(int64_t rows, int64_t heads, int64_t seqlen, const cudaDeviceProp& prop);
const char* ssd_fwd_wgmma_split(FwdParams prm, int dstate, int nseg, const at::Tensor& dt,
                                const at::Tensor& A, const std::optional<at::Tensor>& dt_bias,
                                const std::optional<at::Tensor>& init, bool dt_softplus,
                                double dt_min, double dt_max, const at::Tensor& final_states,
                                bool vectors, bool ws, cudaStream_t stream);

// Step 2 in one launch (fwd_split_states.cu): S (b, nsub / m + 1, h, pn) fp32 with S[:, 0]
// set (or zero0: zeros written there) gets S[:, j] for j >= 1 from E (b * nsub, h, pn) and the
// sub-segments' decays (b * nsub, h) that step 1's walk wrote (FwdParams::seg_decay).
void split_combine_states(const float* E, const float* decay, float* S, int64_t b, int64_t h,
                          int64_t pn, int nsub, int m, bool zero0, cudaStream_t stream);

}  // namespace ssd
}  // namespace mlmamba
