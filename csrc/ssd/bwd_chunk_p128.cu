// SSD backward step 2, instantiated for headdim <= 128 (one file per size: parallel builds).
#include "ssd/bwd_chunk.cuh"

namespace mlmamba {
namespace ssd_bwd {
void launch_chunk_p128(const Params& prm, int tcode, cudaStream_t st) {
  launch_chunk_impl<128>(prm, tcode, st);
}
size_t chunk_smem_p128(int npad, bool onchip) { return chunk_smem_impl<128>(npad, onchip); }
bool chunk_onchip_fits_p128(int npad, size_t optin) {
  return chunk_onchip_fits_impl<128>(npad, optin);
}
}  // namespace ssd_bwd
}  // namespace mlmamba
