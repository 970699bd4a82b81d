// Causal conv1d forward, l contiguous, one-shot fast path (no seq_idx, 16-byte aligned
// tensors; rows may start anywhere: oneshot_ok). Shaped like torch's elementwise kernels:
// one warp per tile of 256*K elements of one row, blocks in address order, each lane loads its
// K 8-element vectors once, computes, stores and exits. On an H200 a one-shot copy ran at
// 98-100% of cudaMemcpy where warps that each walk a range of tiles (the pipe kernels) ran at
// 89-93% (scripts/dev/copy_order.cu). A row that starts a0 elements before a 16-byte boundary
// has its tiles start at position a0, so every vector is aligned; lane 0 of its first tile
// computes positions 0 .. a0-1 alone.
// The w-1 look-back comes from the previous lane by shuffle, for lane 0 from one 16-byte load
// of the 8 elements before the tile (an L2 hit: the previous warp reads them too).
#include "conv1d/fwd_lcontig_oneshot.cuh"

namespace mlmamba {
namespace conv1d {

void fwd_lcontig_oneshot(const ConvParams& p, int xdtype, cudaStream_t s) {
  MLM_CHECK(p.batch < (1 << 30) && p.dim < (1 << 30) && p.seqlen < (1 << 30), "causal_conv1d_fwd: input too large");
  const bool any = !rows_aligned16(p, xdtype == kF32 ? 4 : 2);
  if (fwd_lcontig_rows(p, xdtype, any, s)) return;
  if (!any) fwd_lcontig_oneshot_rows<false>(p, xdtype, s);
  else fwd_lcontig_oneshot_any(p, xdtype, s);
}

}  // namespace conv1d
}  // namespace mlmamba
