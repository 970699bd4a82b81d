// The one-shot l-contiguous forward on rows that may start anywhere (fwd_lcontig_oneshot.cuh).
#include "conv1d/fwd_lcontig_oneshot.cuh"

namespace mlmamba {
namespace conv1d {

void fwd_lcontig_oneshot_any(const ConvParams& p, int xdtype, cudaStream_t s) {
  fwd_lcontig_oneshot_rows<true>(p, xdtype, s);
}

}  // namespace conv1d
}  // namespace mlmamba
