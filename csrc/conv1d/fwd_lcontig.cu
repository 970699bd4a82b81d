// Causal conv1d forward, l contiguous: the instantiations without seq_idx
// (kernel in fwd_lcontig.cuh; split in two files so they compile in parallel).
#include "conv1d/fwd_lcontig.cuh"

namespace mlmamba {
namespace conv1d {

template void fwd_lcontig_launch<false>(const ConvParams&, int, cudaStream_t);
extern template void fwd_lcontig_launch<true>(const ConvParams&, int, cudaStream_t);

void fwd_lcontig(const ConvParams& p, int xdtype, cudaStream_t s) {
  if (p.seq != nullptr) fwd_lcontig_launch<true>(p, xdtype, s);
  else fwd_lcontig_launch<false>(p, xdtype, s);
}

}  // namespace conv1d
}  // namespace mlmamba
