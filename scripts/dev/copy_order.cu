// Developer micro-benchmark (not part of the build): does the order in which warps walk memory
// change a streaming kernel's DRAM rate? Copies n bytes with the same per-tile code in three
// orders: one-shot (a warp per tile, blocks in address order, as torch's elementwise kernels),
// persistent ranges (each warp a contiguous range of tiles, as the conv1d pipe kernels), and
// persistent grid-stride (all warps sweep memory together). Plus cudaMemcpyAsync.
//   nvcc -O3 -arch=sm_90a -o /tmp/copy_order scripts/dev/copy_order.cu && /tmp/copy_order 176160768
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

template <int K>
__device__ __forceinline__ void ld_tile(const uint4* src, int64_t t, int lane, uint4 (&v)[K]) {
  #pragma unroll
  for (int k = 0; k < K; ++k) v[k] = __ldg(src + t * 32 * K + k * 32 + lane);
}
template <int K>
__device__ __forceinline__ void st_tile(uint4* dst, int64_t t, int lane, const uint4 (&v)[K]) {
  #pragma unroll
  for (int k = 0; k < K; ++k) dst[t * 32 * K + k * 32 + lane] = v[k];
}

template <int K>
__global__ void __launch_bounds__(128) oneshot(const uint4* src, uint4* dst, int64_t ntiles) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (t >= ntiles) return;
  uint4 v[K];
  ld_tile<K>(src, t, threadIdx.x & 31, v);
  st_tile<K>(dst, t, threadIdx.x & 31, v);
}

// Persistent: tile i of warp w is w*per + i (ranges) or w + i*nw (stride). Two tiles in flight.
template <int K, bool kStride>
__global__ void __launch_bounds__(128) persistent(const uint4* src, uint4* dst, int64_t ntiles) {
  const int lane = threadIdx.x & 31;
  const int64_t nw = static_cast<int64_t>(gridDim.x) * 4, w = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int64_t per = (ntiles + nw - 1) / nw;
  const int64_t n = kStride ? (ntiles - w + nw - 1) / nw : min(per, max(ntiles - w * per, static_cast<int64_t>(0)));
  auto tile = [&](int64_t i) { return kStride ? w + i * nw : w * per + i; };
  uint4 a[K], b[K];
  if (n > 0) ld_tile<K>(src, tile(0), lane, a);
  if (n > 1) ld_tile<K>(src, tile(1), lane, b);
  for (int64_t i = 0; i < n; i += 2) {
    st_tile<K>(dst, tile(i), lane, a);
    if (i + 2 < n) ld_tile<K>(src, tile(i + 2), lane, a);
    if (i + 1 < n) st_tile<K>(dst, tile(i + 1), lane, b);
    if (i + 3 < n) ld_tile<K>(src, tile(i + 3), lane, b);
  }
}

int main(int argc, char** argv) {
  const int64_t bytes = argc > 1 ? atoll(argv[1]) : 176160768;
  const int reps = 20, rounds = 9;
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint4 *s0, *d0, *s1, *d1;  // two input sets, as the benches rotate
  CK(cudaMalloc(&s0, bytes)); CK(cudaMalloc(&d0, bytes)); CK(cudaMalloc(&s1, bytes)); CK(cudaMalloc(&d1, bytes));
  CK(cudaMemset(s0, 1, bytes)); CK(cudaMemset(s1, 2, bytes));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  struct V { const char* name; void (*f)(const uint4*, uint4*, int64_t, int, cudaStream_t); };
  static int64_t nbytes;
  nbytes = bytes;
  std::vector<V> vs = {
    {"memcpy", [](const uint4* s, uint4* d, int64_t, int, cudaStream_t t) { CK(cudaMemcpyAsync(d, s, nbytes, cudaMemcpyDeviceToDevice, t)); }},
    {"oneshot K1 (512 B / warp)", [](const uint4* s, uint4* d, int64_t n, int, cudaStream_t t) { int64_t nt = n / 512; oneshot<1><<<(nt + 3) / 4, 128, 0, t>>>(s, d, nt); }},
    {"oneshot K2 (1 KB / warp)", [](const uint4* s, uint4* d, int64_t n, int, cudaStream_t t) { int64_t nt = n / 1024; oneshot<2><<<(nt + 3) / 4, 128, 0, t>>>(s, d, nt); }},
    {"oneshot K4 (2 KB / warp)", [](const uint4* s, uint4* d, int64_t n, int, cudaStream_t t) { int64_t nt = n / 2048; oneshot<4><<<(nt + 3) / 4, 128, 0, t>>>(s, d, nt); }},
    {"ranges K4 8 blk/SM", [](const uint4* s, uint4* d, int64_t n, int sm, cudaStream_t t) { persistent<4, false><<<8 * sm, 128, 0, t>>>(s, d, n / 2048); }},
    {"stride K4 8 blk/SM", [](const uint4* s, uint4* d, int64_t n, int sm, cudaStream_t t) { persistent<4, true><<<8 * sm, 128, 0, t>>>(s, d, n / 2048); }},
    {"ranges K2 16 blk/SM", [](const uint4* s, uint4* d, int64_t n, int sm, cudaStream_t t) { persistent<2, false><<<16 * sm, 128, 0, t>>>(s, d, n / 1024); }},
    {"stride K2 16 blk/SM", [](const uint4* s, uint4* d, int64_t n, int sm, cudaStream_t t) { persistent<2, true><<<16 * sm, 128, 0, t>>>(s, d, n / 1024); }},
  };
  std::vector<cudaGraphExec_t> gx(vs.size());
  for (size_t v = 0; v < vs.size(); ++v) {
    cudaGraph_t g;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    for (int r = 0; r < reps; ++r) vs[v].f(r & 1 ? s1 : s0, r & 1 ? d1 : d0, bytes, sms, st);
    CK(cudaStreamEndCapture(st, &g));
    CK(cudaGraphInstantiate(&gx[v], g, 0));
    CK(cudaGraphLaunch(gx[v], st));  // warm-up
  }
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  std::vector<std::vector<float>> ts(vs.size());
  for (int r = 0; r < rounds; ++r)
    for (size_t v = 0; v < vs.size(); ++v) {
      CK(cudaEventRecord(e0, st));
      CK(cudaGraphLaunch(gx[v], st));
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      ts[v].push_back(ms * 1e3f / reps);
    }
  // check the last copy
  std::vector<unsigned char> h(4096);
  CK(cudaMemcpy(h.data(), reinterpret_cast<char*>(d1) + bytes - 4096, 4096, cudaMemcpyDeviceToHost));
  printf("copy order, %lld bytes, %d SMs (check byte %d)\n", static_cast<long long>(bytes), sms, h[4095]);
  const double base = [&] { auto t = ts[0]; std::sort(t.begin(), t.end()); return t[t.size() / 2]; }();
  for (size_t v = 0; v < vs.size(); ++v) {
    auto t = ts[v];
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    printf("  %-28s %8.2f us  %7.1f GB/s  %5.1f%% of memcpy  (min %.2f max %.2f)\n", vs[v].name, med,
           2.0 * bytes / med * 1e-3, 100.0 * base / med, t.front(), t.back());
  }
  return 0;
}
