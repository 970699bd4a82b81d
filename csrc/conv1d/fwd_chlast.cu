// Causal conv1d forward, channel-last: the instantiations without seq_idx
// (kernel in fwd_chlast.cuh; split in two files so they compile in parallel).
#include "conv1d/fwd_chlast.cuh"

namespace mlmamba {
namespace conv1d {

template void fwd_chlast_launch<false>(const ConvParams&, int, cudaStream_t);
extern template void fwd_chlast_launch<true>(const ConvParams&, int, cudaStream_t);

void fwd_chlast(const ConvParams& p, int xdtype, cudaStream_t s) {
  if (p.seq != nullptr) fwd_chlast_launch<true>(p, xdtype, s);
  else fwd_chlast_launch<false>(p, xdtype, s);
}

}  // namespace conv1d
}  // namespace mlmamba
