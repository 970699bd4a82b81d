// Host-side launch helpers shared by the op families.
#pragma once
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>

namespace mlmamba {

// Why an sm_90a kernel cannot run from this build (nullptr: it can): no image of it, or one
// for another arch. The error that causes is cleared: callers fall back or report.
inline const char* sm90_image_missing(const void* kernel) {
  cudaFuncAttributes attr;
  const char* why = nullptr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) why = "no sm_90a kernel image in this build";
  else if (attr.binaryVersion != 90) why = "the kernel image is not for sm_90";
  if (why) cudaGetLastError();
  return why;
}

// Raise a kernel's dynamic shared-memory limit to at least `bytes` on the current device, once
// per (kernel, device, size): a driver call per launch costs host time on every call.
inline cudaError_t ensure_max_dynamic_smem(const void* kernel, int bytes) {
  static std::mutex mu;
  static std::unordered_map<const void*, int> done[64];  // per device: the largest size set
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  std::lock_guard<std::mutex> lock(mu);
  auto it = done[dev].find(kernel);
  if (it != done[dev].end() && it->second >= bytes) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done[dev][kernel] = bytes;
  return e;
}

}  // namespace mlmamba
