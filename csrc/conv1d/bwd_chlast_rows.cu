// Causal conv1d backward, channel-last, rows mode (x rows through p.rows: msc_scan's conv along
// a scan order; kernel in bwd_chlast.cuh, in its own file so it compiles in parallel).
#include "conv1d/bwd_chlast.cuh"

namespace mlmamba {
namespace conv1d {

void bwd_chlast_rows(const ConvParams& p, int xdtype, cudaStream_t s) {
  bwd_chlast_launch<false, true>(p, xdtype, s);
}

}  // namespace conv1d
}  // namespace mlmamba
