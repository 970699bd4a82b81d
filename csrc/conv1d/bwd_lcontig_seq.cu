// Causal conv1d backward, l contiguous: the instantiations with seq_idx
// (kernel in bwd_lcontig.cuh; split in two files so they compile in parallel).
#include "conv1d/bwd_lcontig.cuh"

namespace mlmamba {
namespace conv1d {

template void bwd_lcontig_launch<true>(const ConvParams&, int, cudaStream_t);

}  // namespace conv1d
}  // namespace mlmamba
