// MLM_SM90: 1 in device code for sm_90 or newer (TMA, mbarrier waits, proxy fences); 0 in host
// code and in the default build's sm_80 pass, where the helpers that need it trap instead.
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MLM_SM90 1
#else
#define MLM_SM90 0
#endif
