// Times kernels/perturb.cu's update_and_make_input_ (uint8 x, fp32 delta,
// bf16 grad and out, channels_last) built with one setting of its tuning
// knobs (FREEADV_FULL_GRID, _F64_DIVISION, _RGB_STEPS, _STREAMING, _MIN_BLOCKS, _RGB_COALESCED), beside a
// device-to-device copy, both alone and 20 calls to a CUDA graph. No torch:
// bench/kernel_variants.sh builds one binary per setting and runs them all.
// Prints one JSON line per batch shape, with a checksum of delta and the
// output so that the script can check every variant computes the same bits.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "perturb.h"

#if !defined(FREEADV_FULL_GRID) || !defined(FREEADV_F64_DIVISION) || !defined(FREEADV_RGB_STEPS) || \
    !defined(FREEADV_STREAMING) || !defined(FREEADV_MIN_BLOCKS) || !defined(FREEADV_RGB_COALESCED)
#error "build with every knob set (-DFREEADV_FULL_GRID=... and the others), as bench/kernel_variants.sh does"
#endif

#define CHECK(call)                                                                        \
  do {                                                                                     \
    cudaError_t e = (call);                                                                \
    if (e != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e));      \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

namespace {

template <typename F>
float median_ms(F&& f, cudaStream_t s, int reps) {
  std::vector<float> t;
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a, s));
    f();
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

template <typename F>
float in_graph_ms(F&& f, cudaStream_t s, int calls = 20, int reps = 10) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) f();
  CHECK(cudaStreamEndCapture(s, &g));
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  CHECK(cudaGraphLaunch(ge, s));
  CHECK(cudaStreamSynchronize(s));
  const float ms = median_ms([&] { CHECK(cudaGraphLaunch(ge, s)); }, s, reps);
  CHECK(cudaGraphExecDestroy(ge));
  CHECK(cudaGraphDestroy(g));
  return ms / calls;
}

uint64_t checksum(const void* dev, size_t bytes) {
  std::vector<uint8_t> h(bytes);
  CHECK(cudaMemcpy(h.data(), dev, bytes, cudaMemcpyDeviceToHost));
  uint64_t sum = 1469598103934665603ull;  // FNV-1a
  for (uint8_t v : h) sum = (sum ^ v) * 1099511628211ull;
  return sum;
}

void run(const char* name, int64_t n, int64_t c, int64_t h, int64_t w, cudaStream_t s) {
  const int64_t numel = n * c * h * w;
  std::vector<uint8_t> hx(numel);
  std::vector<float> hd(numel);
  std::vector<__nv_bfloat16> hg(numel);
  uint32_t r = 12345;
  auto next = [&] { return r = r * 1664525u + 1013904223u; };
  for (int64_t i = 0; i < numel; ++i) {
    hx[i] = static_cast<uint8_t>(next() >> 24);
    hd[i] = ((next() >> 8) / 16777216.0f * 2 - 1) * (4.f / 255);
    hg[i] = __float2bfloat16((next() >> 8) / 16777216.0f - 0.5f);
  }
  uint8_t* x;
  float *delta, *delta0, *src, *dst, *consts;
  __nv_bfloat16 *grad, *out;
  CHECK(cudaMalloc(&x, numel));
  CHECK(cudaMalloc(&delta, numel * 4));
  CHECK(cudaMalloc(&delta0, numel * 4));
  CHECK(cudaMalloc(&grad, numel * 2));
  CHECK(cudaMalloc(&out, numel * 2));
  CHECK(cudaMalloc(&src, numel * 4));
  CHECK(cudaMalloc(&dst, numel * 4));
  CHECK(cudaMalloc(&consts, 12 * sizeof(float)));
  const float hc[12] = {4.f / 255, 4.f / 255, 4.f / 255, 4.f / 255, 4.f / 255, 4.f / 255,
                        0.485f, 0.456f, 0.406f, 0.229f, 0.224f, 0.225f};
  CHECK(cudaMemcpy(consts, hc, sizeof hc, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(x, hx.data(), numel, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(delta0, hd.data(), numel * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(grad, hg.data(), numel * 2, cudaMemcpyHostToDevice));

  freeadv::PerturbArgs a;
  a.x = x, a.x_dtype = freeadv::DType::U8, a.delta = delta, a.grad = grad, a.grad_dtype = freeadv::DType::BF16;
  a.out = out, a.out_dtype = freeadv::DType::BF16;
  a.step = consts, a.eps = consts + 3, a.mean = consts + 6, a.std = consts + 9;
  a.numel = numel, a.channels = c, a.channel_stride = 1;  // channels_last
  a.mode = freeadv::PixelMode::ClampInput, a.update = true;

  // the bits of one call from the same start, for the cross-variant check
  CHECK(cudaMemcpy(delta, delta0, numel * 4, cudaMemcpyDeviceToDevice));
  freeadv::perturb_cuda(a, s);
  CHECK(cudaStreamSynchronize(s));
  const uint64_t sum = checksum(delta, numel * 4) ^ (checksum(out, numel * 2) * 31);

  auto op = [&] { freeadv::perturb_cuda(a, s); };
  auto copy = [&] { CHECK(cudaMemcpyAsync(dst, src, numel * 4, cudaMemcpyDeviceToDevice, s)); };
  for (int i = 0; i < 5; ++i) op(), copy();
  const float op_ms = median_ms(op, s, 50), copy_ms = median_ms(copy, s, 50);
  const float op_g = in_graph_ms(op, s), copy_g = in_graph_ms(copy, s);
  const double bytes = 13.0 * numel, copy_bytes = 8.0 * numel;  // 1 + 4 + 2 read, 4 + 2 written
  std::printf("{\"shape\": \"%s\", \"full_grid\": %d, \"f64_division\": %d, \"rgb_steps\": %d, \"streaming\": %d, \"min_blocks\": %d, \"rgb_coalesced\": %d, \"op_ms\": %.5f, "
              "\"op_in_graph_ms\": %.5f, \"copy_gbps\": %.1f, \"copy_in_graph_gbps\": %.1f, \"op_gbps\": %.1f, "
              "\"op_in_graph_gbps\": %.1f, \"checksum\": \"%016llx\"}\n",
              name, FREEADV_FULL_GRID, FREEADV_F64_DIVISION, FREEADV_RGB_STEPS, FREEADV_STREAMING, FREEADV_MIN_BLOCKS,
              FREEADV_RGB_COALESCED, op_ms, op_g, copy_bytes / copy_ms / 1e6,
              copy_bytes / copy_g / 1e6, bytes / op_ms / 1e6, bytes / op_g / 1e6, (unsigned long long)sum);
  for (void* p : {(void*)x, (void*)delta, (void*)delta0, (void*)grad, (void*)out, (void*)src, (void*)dst,
                  (void*)consts})
    CHECK(cudaFree(p));
}

}  // namespace

int main() {
  cudaStream_t s;
  CHECK(cudaStreamCreate(&s));
  run("imagenet 256x3x224x224", 256, 3, 224, 224, s);
  run("cifar 512x3x32x32", 512, 3, 32, 32, s);
  return 0;
}
