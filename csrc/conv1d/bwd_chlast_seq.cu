// Causal conv1d backward, channel-last: the instantiations with seq_idx
// (kernel in bwd_chlast.cuh; split in two files so they compile in parallel).
#include "conv1d/bwd_chlast.cuh"

namespace mlmamba {
namespace conv1d {

template void bwd_chlast_launch<true>(const ConvParams&, int, cudaStream_t);

}  // namespace conv1d
}  // namespace mlmamba
