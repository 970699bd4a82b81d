// Causal conv1d backward, channel-last: the instantiations without seq_idx
// (kernel in bwd_chlast.cuh; split in two files so they compile in parallel).
#include "conv1d/bwd_chlast.cuh"

namespace mlmamba {
namespace conv1d {

template void bwd_chlast_launch<false>(const ConvParams&, int, cudaStream_t);
extern template void bwd_chlast_launch<true>(const ConvParams&, int, cudaStream_t);

void bwd_chlast(const ConvParams& p, int xdtype, cudaStream_t s) {
  if (p.seq != nullptr) bwd_chlast_launch<true>(p, xdtype, s);
  else bwd_chlast_launch<false>(p, xdtype, s);
}

}  // namespace conv1d
}  // namespace mlmamba
