// SSD scan forward kernels for fp32 x/B/C (every d_state and head-channel slice).
#include "ssd/fwd_kernel.cuh"

MLM_SSD_FWD_INSTANTIATE(float, f32)
