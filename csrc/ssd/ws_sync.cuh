// What the warp-specialized forward kernels (fwd_ws.cu, fwd_ws_msc.cu) share: their
// synchronisation and their launch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/launch.h"
#include "common/tma.cuh"
#include "ssd/fwd.h"
#include "ssd/wgmma.cuh"

namespace mlmamba {
namespace ssd {

// Their shape: two warpgroups of 128 threads; setmaxnreg gives the state warpgroup (WG0)
// kWsRegsState registers per thread and the output warpgroup (WG1) kWsRegsOutput.
constexpr int kWsThreads = 256, kWsWgThreads = 128;
constexpr int kWsRegsState = 152, kWsRegsOutput = 104;
static_assert(kWsRegsState + kWsRegsOutput == 256, "two warpgroups share 2 x 128 registers");

// The state warpgroup hands chunk c's masked M (A fragments ma, from wg::mask_m) to the
// output warpgroup: once its M X of chunk c - 1 is done (mfree), M goes to the bf16 panel at
// m_base (wg::state_store_base of Mbuf) and mready completes (completion c).
__device__ __forceinline__ void hand_over_m(const uint32_t (&ma)[4][4], uint32_t m_base,
                                            uint32_t mfree, uint32_t mready, int c) {
  if (c > 0) wait_phase(mfree, (c - 1) & 1);
  __syncwarp();
#pragma unroll
  for (int jp = 0; jp < 4; ++jp) stsm_x4(m_base ^ (jp << 5), ma[jp][0], ma[jp][1], ma[jp][2], ma[jp][3]);
  fence_async_smem();
  mbar_arrive(mready);
}

// The launch of a warp-specialized kernel: one CTA per (head, row) of kWsThreads threads and
// `smem` bytes, after the chunk-vector pre-pass. nullptr when launched, else why not
// (no_vecs: where the pre-pass cannot serve these inputs).
template <auto kKernel>
const char* launch_ws_grid(const FwdParams& p, int smem, const char* no_vecs, cudaStream_t stream) {
  static const char* const image = sm90_image_missing(reinterpret_cast<const void*>(kKernel));
  if (image) return image;
  if (ensure_max_dynamic_smem(reinterpret_cast<const void*>(kKernel), smem) != cudaSuccess) {
    cudaGetLastError();
    return "cannot reserve its shared memory";
  }
  const FwdParams q = p.vecs ? p : ssd_fwd_vectors(p, stream);  // unless the caller made it
  if (!q.vecs) return no_vecs;
  const unsigned scans = p.msc.split ? static_cast<unsigned>(p.msc.nscans) : 1u;
  const dim3 grid(static_cast<unsigned>(p.nheads), static_cast<unsigned>(p.nrows), scans);
  kKernel<<<grid, kWsThreads, smem, stream>>>(q);
  return nullptr;
}

}  // namespace ssd
}  // namespace mlmamba
