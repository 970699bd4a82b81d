// Causal conv1d forward, channel-last, rows mode (x rows through p.rows: msc_scan's conv along a
// scan order; kernel in fwd_chlast.cuh, in its own file so it compiles in parallel).
#include "conv1d/fwd_chlast.cuh"

namespace mlmamba {
namespace conv1d {

void fwd_chlast_rows(const ConvParams& p, int xdtype, cudaStream_t s) {
  fwd_chlast_launch<false, true>(p, xdtype, s);
}

}  // namespace conv1d
}  // namespace mlmamba
