// SSD backward step 2, instantiated for headdim <= 32 (one file per size: parallel builds).
#include "ssd/bwd_chunk.cuh"

namespace mlmamba {
namespace ssd_bwd {
void launch_chunk_p32(const Params& prm, int tcode, cudaStream_t st) {
  launch_chunk_impl<32>(prm, tcode, st);
}
size_t chunk_smem_p32(int npad, bool onchip) { return chunk_smem_impl<32>(npad, onchip); }
bool chunk_onchip_fits_p32(int npad, size_t optin) {
  return chunk_onchip_fits_impl<32>(npad, optin);
}
}  // namespace ssd_bwd
}  // namespace mlmamba
