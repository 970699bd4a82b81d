// Causal conv1d forward, channel-last: the instantiations with seq_idx
// (kernel in fwd_chlast.cuh; split in two files so they compile in parallel).
#include "conv1d/fwd_chlast.cuh"

namespace mlmamba {
namespace conv1d {

template void fwd_chlast_launch<true>(const ConvParams&, int, cudaStream_t);

}  // namespace conv1d
}  // namespace mlmamba
