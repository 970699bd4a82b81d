// SSD scan forward kernels for bf16 x/B/C (every d_state and head-channel slice).
#include "ssd/fwd_kernel.cuh"

MLM_SSD_FWD_INSTANTIATE(__nv_bfloat16, bf16)
