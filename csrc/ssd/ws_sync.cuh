// Synchronisation of the warp-specialized forward kernels (fwd_ws.cu, fwd_ws_msc.cu).
#pragma once
#include <cstdint>

#include "ssd/tma.cuh"

namespace mlmamba {
namespace ssd {

// named barrier id over n threads (warps of whole warpgroups)
__device__ __forceinline__ void bar_sync_n(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
// a wait that cannot hang the device: trap after ~2^35 cycles (~17 s) without the phase
__device__ __forceinline__ void wait_phase(uint32_t bar, uint32_t parity) {
  const long long t0 = clock64();
  while (!mbar_test(bar, parity))
    if (clock64() - t0 > (1ll << 35)) __trap();
}

}  // namespace ssd
}  // namespace mlmamba
