// Causal conv1d forward, l contiguous: the instantiations with seq_idx
// (kernel in fwd_lcontig.cuh; split in two files so they compile in parallel).
#include "conv1d/fwd_lcontig.cuh"

namespace mlmamba {
namespace conv1d {

template void fwd_lcontig_launch<true>(const ConvParams&, int, cudaStream_t);

}  // namespace conv1d
}  // namespace mlmamba
