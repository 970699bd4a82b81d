// sm_90 tensor-memory-access (TMA) loads and stores and the shared-memory mbarriers that track
// them, for the wgmma SSD kernels (ssd/fwd_wgmma.cu, ...) and the conv1d TMA kernels. One
// thread issues a tile's loads; every consumer waits on the stage's mbarrier (phase parity =
// how many times the stage was filled before, mod 2). Compiled for an older target (the default build also makes sm_80 code) each helper
// traps: the sm_90 kernels are only launched on an sm_90 image (their launchers check).
#pragma once
#include <cuda.h>

#include <cstdint>

#include "common/arch.h"

namespace mlmamba {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if MLM_SM90
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  __trap();
#endif
}
// the inits -> the async proxy (the TMA unit completes transactions on these barriers)
__device__ __forceinline__ void mbar_init_fence() {
#if MLM_SM90
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if MLM_SM90
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}
// one arrival (release: this thread's earlier shared-memory accesses happen before the phase
// completes for the waiters)
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if MLM_SM90
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  __trap();
#endif
}
// one probe: whether the phase of this parity has completed
__device__ __forceinline__ bool mbar_test(uint32_t bar, uint32_t parity) {
  uint32_t done = 1;
#if MLM_SM90
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
#else
  __trap();
#endif
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if MLM_SM90
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  __trap();
#endif
}
// a wait that cannot hang the device: trap after ~2^35 cycles (~17 s) without the phase
__device__ __forceinline__ void wait_phase(uint32_t bar, uint32_t parity) {
  const long long t0 = clock64();
  while (!mbar_test(bar, parity))
    if (clock64() - t0 > (1ll << 35)) __trap();
}
// named barrier id over n threads (warps of whole warpgroups)
__device__ __forceinline__ void bar_sync_n(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
// box at coordinates (c0 innermost .. c3) of a 4-D tensor map into shared memory at dst
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                            int c2, int c3, uint32_t bar) {
#if MLM_SM90
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
#else
  __trap();
#endif
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global src into shared
// memory at dst, completing on the mbarrier like the tile loads
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
#if MLM_SM90
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(bar)
      : "memory");
#else
  __trap();
#endif
}

// dst[0], dst[1] += v.x, v.y at L2, without a round trip (one vector reduction; sm_90). The
// float reductions flush subnormal inputs and results to zero (SASS REDG ... .FTZ.RN).
__device__ __forceinline__ void red_add_f32x2(float* dst, float2 v) {
#if MLM_SM90
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(v.x), "f"(v.y) : "memory");
#else
  __trap();
#endif
}

// TMA stores (bulk groups): one thread writes a box of shared memory at src to a 4-D tensor
// map's tensor at coordinates (c0 innermost .. c3). The writers of src first run
// fence_async_smem (below) and meet the issuing thread at a barrier.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, uint32_t src, int c0, int c1,
                                             int c2, int c3) {
#if MLM_SM90
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n"
      ::"l"(reinterpret_cast<uint64_t>(map)), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if MLM_SM90
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}
// this thread's committed bulk groups: all but the newest N have read their shared memory
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
#if MLM_SM90
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}
// ... and are complete (their global writes done)
__device__ __forceinline__ void bulk_wait_all() {
#if MLM_SM90
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#else
  __trap();
#endif
}

// generic-proxy writes to shared memory (st.shared, cp.async) -> visible to the async proxy
// (wgmma's reads, TMA stores)
__device__ __forceinline__ void fence_async_smem() {
#if MLM_SM90
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}

}  // namespace mlmamba
