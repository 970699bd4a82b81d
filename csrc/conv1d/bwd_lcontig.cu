// Causal conv1d backward, l contiguous: the instantiations without seq_idx
// (kernel in bwd_lcontig.cuh; split in two files so they compile in parallel).
#include "conv1d/bwd_lcontig.cuh"

namespace mlmamba {
namespace conv1d {

template void bwd_lcontig_launch<false>(const ConvParams&, int, cudaStream_t);
extern template void bwd_lcontig_launch<true>(const ConvParams&, int, cudaStream_t);

void bwd_lcontig(const ConvParams& p, int xdtype, cudaStream_t s) {
  if (p.seq != nullptr) bwd_lcontig_launch<true>(p, xdtype, s);
  else bwd_lcontig_launch<false>(p, xdtype, s);
}

}  // namespace conv1d
}  // namespace mlmamba
