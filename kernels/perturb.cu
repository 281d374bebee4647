// CUDA implementation of the fused perturbation kernel (see csrc/perturb.h and
// the spec in freeadv_fast/ops/reference.py).
//
// Plain CUDA, no torch headers: the host glue in csrc/ops.cpp hands over raw
// pointers and the stream. The op streams 13 bytes an element (uint8 x,
// float32 delta, 16-bit grad and out), so it is bound by memory only if an
// element costs few instructions: an H200 moves about 18 bytes per SM and
// cycle, which leaves some 40 instructions an element. Hence:
// - the pixel mode and whether delta is updated are template parameters, so
//   the inner loop has no mode branches;
// - RGB channels_last (channel_stride 1, 3 channels), the layout training
//   uses, has its own path: a thread takes 12 elements (4 pixels), whose
//   channels are 0,1,2,0,1,2,... at compile time, with the 3 channels'
//   constants in registers: no index arithmetic, no table;
// - uint8 x / 255 is the exact quotient from a multiply and two FMAs (checked
//   for all 256 values by tests/test_kernel_arithmetic.py), no division;
// - the normalisation (v - mean) / std is correctly rounded, as the spec
//   asks bit for bit, but without a division on GPUs whose fp64 rate is at
//   least half their fp32 rate (P100, V100, A100, H100, H200): v - mean in
//   float, times 1/std rounded to double, rounded to float. Why that is the
//   correctly rounded quotient: for binary32 a, b with a/b in [2^e, 2^(e+1)),
//   a - b*m for a rounding midpoint m is a nonzero multiple of
//   2^(e_b + e - 47) (a/b is never a midpoint), so |a/b - m| > 2^(e-48);
//   the double product is within 2^(e-51) of a/b, so it rounds to the same
//   float. Other GPUs take the general path, with __fdiv_rn. tests/test_kernel_arithmetic.py
//   replays both on CPU against float division.
// Other layouts take packs of FREEADV_X_PACK_BYTES of x and walk the channel
// from one integer division a pack, with the constants in shared memory. A
// scalar loop finishes unaligned or ragged ends. No atomics.
// Nothing here needs more than sm_60 (Pascal): no bf16 arithmetic (bf16 is
// only converted, which cuda_bf16.h emulates on old GPUs), no async copies.
#include "perturb.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace freeadv {
namespace {

struct NoTensor {};  // stands for an absent grad or out

constexpr int kThreads = 256;
constexpr int kMaxSharedChannels = 64;  // more channels read their constants from global memory
constexpr int kRgbPixels = 4;           // pixels a thread takes per step on the RGB channels_last path
constexpr int kRgbElems = 3 * kRgbPixels;
constexpr int kWarp = 32;

// Tuning knobs, measured with bench/kernel_variants.sh (one binary per
// setting; bench/results/kernel-variants-<gpu>.jsonl). The defaults are the
// fastest measured on an H100 (kernel-variants-*h100.jsonl: one thread per
// pack, the fp64 division, two steps of 12 elements a thread, 0.185 ms for the
// ImageNet batch in a graph); streaming hints and a block minimum are still
// to be measured.
#ifndef FREEADV_X_PACK_BYTES  // bytes of x per pack and thread on the general path
#define FREEADV_X_PACK_BYTES 4
#endif
#ifndef FREEADV_FULL_GRID  // 1: a thread per pack; 0: grid-stride loop over resident blocks
#define FREEADV_FULL_GRID 1
#endif
#ifndef FREEADV_F64_DIVISION  // 1: the fp64 reciprocal where the GPU's fp64 rate allows; 0: __fdiv_rn always
#define FREEADV_F64_DIVISION 1
#endif
#ifndef FREEADV_STREAMING  // 1: loads and stores with evict-first (streaming) cache hints
#define FREEADV_STREAMING 0
#endif
#ifndef FREEADV_MIN_BLOCKS  // the RGB kernel's __launch_bounds__ minimum of resident blocks per SM (0: none)
#define FREEADV_MIN_BLOCKS 0
#endif
#ifndef FREEADV_RGB_STEPS  // steps of 12 elements a thread loads before computing (RGB path)
#define FREEADV_RGB_STEPS 2
#endif
// 0: a thread's 12 elements of a step are contiguous, so a warp's access
// strides 48 bytes of delta between lanes and each access instruction touches
// three times the sectors it uses; 1: a step is a warp's 32 x 12 contiguous
// elements, lane-interleaved in packs of 4, so each access of a warp is
// contiguous (the layout Inductor's kernels use). Unmeasured: 0 stays the
// default until bench/kernel_variants.sh has timed 1 on a GPU.
#ifndef FREEADV_RGB_COALESCED
#define FREEADV_RGB_COALESCED 0
#endif

// x / 255 for uint8 x, correctly rounded: q = x * RN(1/255) is within an ulp,
// and one FMA residual step rounds it exactly (all 256 values checked).
constexpr float kInv255 = 1.0f / 255.0f;
__device__ __forceinline__ float u8_to_unit(uint32_t v) {
  const float x = static_cast<float>(v);
  const float q = x * kInv255;
  return __fmaf_rn(__fmaf_rn(-q, 255.0f, x), kInv255, q);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float pixel(uint8_t v) { return u8_to_unit(v); }
__device__ __forceinline__ float pixel(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kVec elements of one tensor, moved with 16-byte accesses where the pack is
// a multiple of 16 bytes (and with one narrower access otherwise).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec >= 16 ? 16 : sizeof(T) * kVec) Pack {
  T v[kVec];
};

// One access of W bytes (16, 8 or 4), streamed (evict-first: each byte is
// touched once a call) with FREEADV_STREAMING, else through the read-only path.
template <int W>
using Word = std::conditional_t<W == 16, uint4, std::conditional_t<W == 8, uint2, unsigned int>>;

template <int W>
__device__ __forceinline__ Word<W> load_word(const Word<W>* p) {
  return FREEADV_STREAMING ? __ldcs(p) : __ldg(p);
}

template <int W>
__device__ __forceinline__ void store_word(Word<W>* p, Word<W> v) {
  if (FREEADV_STREAMING)
    __stcs(p, v);
  else
    *p = v;
}

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  constexpr int kBytes = sizeof(T) * kVec;
  constexpr int W = kBytes % 16 == 0 ? 16 : kBytes == 8 ? 8 : kBytes == 4 ? 4 : 0;
  Pack<T, kVec> r;
  if constexpr (W != 0) {
#pragma unroll
    for (int k = 0; k < kBytes / W; ++k)
      reinterpret_cast<Word<W>*>(&r)[k] = load_word<W>(reinterpret_cast<const Word<W>*>(p) + k);
  } else {
    r = *reinterpret_cast<const Pack<T, kVec>*>(p);
  }
  return r;
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& v) {
  constexpr int kBytes = sizeof(T) * kVec;
  constexpr int W = kBytes % 16 == 0 ? 16 : kBytes == 8 ? 8 : kBytes == 4 ? 4 : 0;
  if constexpr (W != 0) {
#pragma unroll
    for (int k = 0; k < kBytes / W; ++k)
      store_word<W>(reinterpret_cast<Word<W>*>(p) + k, reinterpret_cast<const Word<W>*>(&v)[k]);
  } else {
    *reinterpret_cast<Pack<T, kVec>*>(p) = v;
  }
}

struct Params {
  const float* __restrict__ step;
  const float* __restrict__ eps;
  const float* __restrict__ mean;
  const float* __restrict__ std;
  float lo, hi;
  int64_t channels, channel_stride;
  bool index32;  // numel < 2^32: cheaper 32-bit index arithmetic
};

// One channel's constants (inv_std: 1 / std rounded to double, for the fp64 division).
struct Channel {
  float step, eps, mean, std;
  double inv_std;
};

template <bool kF64Division>
__device__ __forceinline__ Channel channel_at(const Params& p, int64_t c) {
  return {p.step[c], p.eps[c], p.mean[c], p.std[c], kF64Division ? __drcp_rn(static_cast<double>(p.std[c])) : 0.0};
}

// (v - mean) / std, correctly rounded (see the top of the file for why the fp64 form is).
template <bool kF64Division>
__device__ __forceinline__ float normalize(float v, const Channel& k) {
  if constexpr (kF64Division) return __double2float_rn(static_cast<double>(v - k.mean) * k.inv_std);
  return __fdiv_rn(v - k.mean, k.std);
}

__device__ __forceinline__ float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The spec for one element: updates d in place (if kUpdate) and returns the
// normalised model input made from the (new) delta.
// step * sign(g) * mask as the reference computes it, zeros' signs included
// (step > 0): +-step, +0 where g is 0 or NaN, and sign(g) * 0 where masked.
template <typename GT>
__device__ __forceinline__ float signed_step(GT g, float step, bool mask) {
  if constexpr (std::is_same_v<GT, NoTensor>) {
    return 0.f;
  } else {
    const float f = to_float(g);
    return f > 0.f ? (mask ? step : 0.f) : (f < 0.f ? (mask ? -step : -0.f) : 0.f);
  }
}

template <bool kUpdate, PixelMode kMode, bool kF64Division, typename GT>
__device__ __forceinline__ float element(float lo, float hi, const Channel& k, float xv, float& d, GT g) {
  if constexpr (kUpdate) {
    if constexpr (kMode == PixelMode::Project) {
      d = clampf(d + signed_step(g, k.step, true), -k.eps, k.eps);
      d = clampf(xv + d, lo, hi) - xv;
    } else {
      const float s = xv + d;
      const bool inside = kMode == PixelMode::ClampInputStrict ? (s > lo && s < hi) : (s >= lo && s <= hi);
      d = clampf(d + signed_step(g, k.step, inside), -k.eps, k.eps);
    }
  }
  float v = xv + d;
  if constexpr (kMode != PixelMode::Project) v = clampf(v, lo, hi);
  return normalize<kF64Division>(v, k);
}

// The RGB channels_last path. A unit of work is kRgbUnit consecutive
// elements from a multiple of kRgbUnit (a multiple of 3): a thread's 12, or
// with FREEADV_RGB_COALESCED a warp's 32 x 12, where access a of lane l
// covers elements a*128 + 4*l .. +3. Either way the channel of element j of
// access a is (a * kAccessStride + l * 4 + j) % 3 = (a * kAccessStride + j +
// l) % 3 (4 = 1 mod 3), so with the constants rotated by the lane once, the
// index is a compile-time constant. The caller checks channels == 3,
// channel_stride == 1 and the pointers' alignment.
constexpr int kRgbLanes = FREEADV_RGB_COALESCED ? kWarp : 1;  // threads that share a unit
constexpr int64_t kRgbUnit = int64_t(kRgbLanes) * kRgbElems;
#if FREEADV_MIN_BLOCKS > 0
#define FREEADV_RGB_BOUNDS __launch_bounds__(kThreads, FREEADV_MIN_BLOCKS)
#else
#define FREEADV_RGB_BOUNDS __launch_bounds__(kThreads)
#endif

template <typename XT, typename GT, typename OT, bool kUpdate, PixelMode kMode, bool kF64Division>
__global__ void FREEADV_RGB_BOUNDS
    perturb_rgb_kernel(const XT* __restrict__ x, float* __restrict__ delta, const GT* __restrict__ grad,
                       OT* __restrict__ out, Params p, int64_t steps) {
  constexpr int kV = 4;  // elements per access
  constexpr int kAccesses = kRgbElems / kV;
  constexpr int kAccessStride = kRgbLanes * kV;  // elements between a lane's accesses
  constexpr bool kGrad = !std::is_same_v<GT, NoTensor>;
  constexpr bool kOut = !std::is_same_v<OT, NoTensor>;
  const int lane = threadIdx.x % kRgbLanes;  // kThreads is a multiple of the warp
  Channel k[3];
#pragma unroll
  for (int c = 0; c < 3; ++c) k[c] = channel_at<kF64Division>(p, (c + lane) % 3);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * (blockDim.x / kRgbLanes);  // in units
  for (int64_t s0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kRgbLanes; s0 < steps;
       s0 += stride * FREEADV_RGB_STEPS) {
    Pack<XT, kV> xp[FREEADV_RGB_STEPS][kAccesses];
    Pack<float, kV> dp[FREEADV_RGB_STEPS][kAccesses];
    Pack<GT, kV> gp[FREEADV_RGB_STEPS][kAccesses];
    // the first element of each step this thread takes, and how many of them lie before the end
    int64_t bases[FREEADV_RGB_STEPS];
    int taken = 0;
#pragma unroll
    for (int u = 0; u < FREEADV_RGB_STEPS; ++u) {
      bases[u] = (s0 + u * stride) * kRgbUnit + lane * kV;
      taken += s0 + u * stride < steps;
    }
    // every load of the step(s) first, then the arithmetic
#pragma unroll
    for (int u = 0; u < FREEADV_RGB_STEPS; ++u) {
      if (u >= taken) break;
#pragma unroll
      for (int a = 0; a < kAccesses; ++a) {
        const int64_t i = bases[u] + a * kAccessStride;
        xp[u][a] = load_pack<XT, kV>(x + i);
        dp[u][a] = load_pack<float, kV>(delta + i);
        if constexpr (kGrad) gp[u][a] = load_pack<GT, kV>(grad + i);
      }
    }
#pragma unroll
    for (int u = 0; u < FREEADV_RGB_STEPS; ++u) {
      if (u >= taken) break;
#pragma unroll
      for (int a = 0; a < kAccesses; ++a) {
        const int64_t i = bases[u] + a * kAccessStride;
        Pack<OT, kV> op;
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          const float o = element<kUpdate, kMode, kF64Division>(p.lo, p.hi, k[(a * kAccessStride + j) % 3],
                                                                pixel(xp[u][a].v[j]), dp[u][a].v[j], gp[u][a].v[j]);
          if constexpr (kOut) op.v[j] = from_float<OT>(o);
        }
        if constexpr (kUpdate) store_pack<float, kV>(delta + i, dp[u][a]);
        if constexpr (kOut) store_pack<OT, kV>(out + i, op);
      }
    }
  }
}

__device__ __forceinline__ int64_t channel_of(const Params& p, int64_t i) {
  if (p.index32)
    return (static_cast<uint32_t>(i) / static_cast<uint32_t>(p.channel_stride)) %
           static_cast<uint32_t>(p.channels);
  return (i / p.channel_stride) % p.channels;
}

// 16 bytes of x per pack: 16 uint8 pixels or 4 float32 ones.
template <typename XT>
struct VecOf {
  static constexpr int value =
      FREEADV_X_PACK_BYTES >= static_cast<int>(sizeof(XT)) ? FREEADV_X_PACK_BYTES / static_cast<int>(sizeof(XT)) : 1;
};

// Any layout: packs of kVec elements, the channel walked from one division
// a pack, the constants in shared memory when they fit; `begin` lets the
// RGB path hand over its ragged end.
template <typename XT, typename GT, typename OT, bool kUpdate, PixelMode kMode>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const XT* __restrict__ x, float* __restrict__ delta, const GT* __restrict__ grad,
                   OT* __restrict__ out, Params p, int64_t begin, int64_t numel, bool vectorized) {
  constexpr int kVec = VecOf<XT>::value;
  constexpr bool kGrad = !std::is_same_v<GT, NoTensor>;
  constexpr bool kOut = !std::is_same_v<OT, NoTensor>;
  __shared__ Channel smem[kMaxSharedChannels];
  const bool shared = p.channels <= kMaxSharedChannels;
  if (shared)
    for (int i = threadIdx.x; i < p.channels; i += blockDim.x) smem[i] = channel_at<false>(p, i);
  __syncthreads();
  auto constants = [&](int64_t c) { return shared ? smem[c] : channel_at<false>(p, c); };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  const int64_t vec_end = vectorized ? begin + (numel - begin) / kVec * kVec : begin;
  for (int64_t base = begin + tid * kVec; base < vec_end; base += stride * kVec) {
    const Pack<XT, kVec> xp = load_pack<XT, kVec>(x + base);
    Pack<float, kVec> dp = load_pack<float, kVec>(delta + base);
    Pack<GT, kVec> gp;
    if constexpr (kGrad) gp = load_pack<GT, kVec>(grad + base);
    Pack<OT, kVec> op;
    // Walk the channel from one division per pack instead of one per element.
    int64_t c = channel_of(p, base);
    int64_t r = p.index32 ? static_cast<uint32_t>(base) % static_cast<uint32_t>(p.channel_stride)
                          : base % p.channel_stride;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float o = element<kUpdate, kMode, false>(p.lo, p.hi, constants(c), pixel(xp.v[j]), dp.v[j], gp.v[j]);
      if constexpr (kOut) op.v[j] = from_float<OT>(o);
      if (++r == p.channel_stride) {
        r = 0;
        if (++c == p.channels) c = 0;
      }
    }
    if constexpr (kUpdate) store_pack<float, kVec>(delta + base, dp);
    if constexpr (kOut) store_pack<OT, kVec>(out + base, op);
  }
  for (int64_t i = vec_end + tid; i < numel; i += stride) {
    float d = delta[i];
    GT g{};
    if constexpr (kGrad) g = grad[i];
    const float o = element<kUpdate, kMode, false>(p.lo, p.hi, constants(channel_of(p, i)), pixel(x[i]), d, g);
    if constexpr (kUpdate) delta[i] = d;
    if constexpr (kOut) out[i] = from_float<OT>(o);
  }
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the element type of a float tensor (or NoTensor).
template <typename F>
void with_float_type(DType t, F&& f) {
  switch (t) {
    case DType::None: return f(Tag<NoTensor>{});
    case DType::F32: return f(Tag<float>{});
    case DType::F16: return f(Tag<__half>{});
    case DType::BF16: return f(Tag<__nv_bfloat16>{});
    default: throw std::invalid_argument("freeadv perturb (cuda): unsupported dtype");
  }
}

// Asked of the driver once per device, not once per launch.
int multiprocessors() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device >= 0 && device < kMaxDevices && cached[device] > 0) return cached[device];
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  sms = sms > 0 ? sms : 80;
  if (device >= 0 && device < kMaxDevices) cached[device] = sms;
  return sms;
}

// Whether the current device runs fp64 at least at half its fp32 rate (asked once per device).
bool fast_fp64() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  cudaGetDevice(&device);
  const bool cache = device >= 0 && device < kMaxDevices;
  if (cache && cached[device] != 0) return cached[device] == 1;
  int ratio = 0;
  cudaDeviceGetAttribute(&ratio, cudaDevAttrSingleToDoublePrecisionPerfRatio, device);
  const bool fast = ratio > 0 && ratio <= 2;
  if (cache) cached[device] = fast ? 1 : 2;
  return fast;
}

bool aligned(const void* ptr, size_t bytes) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, int kVec>
constexpr size_t pack_alignment() {
  return std::is_same_v<T, NoTensor> ? 1 : (sizeof(T) * kVec < 16 ? sizeof(T) * kVec : 16);
}

// FULL_GRID 0: as many blocks as can be resident at once (asked once per
// kernel and device), the grid-stride loop does the rest; more would leave a
// partial second wave.
template <auto kKernel>
unsigned blocks_for(int64_t work) {
  int64_t max_blocks = int64_t(1) << 30;
  if (!FREEADV_FULL_GRID) {
    constexpr int kMaxDevices = 64;
    static int resident[kMaxDevices] = {};
    int device = 0;
    cudaGetDevice(&device);
    int per_sm = device >= 0 && device < kMaxDevices ? resident[device] : 0;
    if (per_sm == 0) {
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, 0);
      per_sm = std::max(per_sm, 1);
      if (device >= 0 && device < kMaxDevices) resident[device] = per_sm;
    }
    max_blocks = int64_t(multiprocessors()) * per_sm;
  }
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("freeadv perturb (cuda): launch failed: ") + cudaGetErrorString(err));
}

template <typename XT, typename GT, typename OT, bool kUpdate, PixelMode kMode>
void launch(const PerturbArgs& a, const void* grad, void* out, cudaStream_t stream) {
  constexpr int kVec = VecOf<XT>::value;
  const Params p{a.step, a.eps, a.mean, a.std, a.lo, a.hi, a.channels, a.channel_stride,
                 a.numel < (int64_t(1) << 32)};
  const auto* xs = static_cast<const XT*>(a.x);
  const auto* gs = static_cast<const GT*>(grad);
  auto* os = static_cast<OT*>(out);
  int64_t begin = 0;
  // 4 elements an access: x, delta, grad and out aligned to 4 of their elements (16 bytes at most)
  // The RGB path is built with one division (FREEADV_F64_DIVISION), which halves the kernels to compile; a
  // GPU whose fp64 is slow takes the general path (with __fdiv_rn) when the RGB kernel divides in fp64.
  const bool rgb = a.channels == 3 && a.channel_stride == 1 && aligned(a.x, pack_alignment<XT, 4>()) &&
                   aligned(a.delta, pack_alignment<float, 4>()) && aligned(grad, pack_alignment<GT, 4>()) &&
                   aligned(out, pack_alignment<OT, 4>()) && (!FREEADV_F64_DIVISION || fast_fp64());
  if (rgb) {
    const int64_t steps = a.numel / kRgbUnit;
    if (steps > 0) {
      const int64_t work = (steps + FREEADV_RGB_STEPS - 1) / FREEADV_RGB_STEPS * kRgbLanes;  // threads
      constexpr auto kernel = perturb_rgb_kernel<XT, GT, OT, kUpdate, kMode, bool(FREEADV_F64_DIVISION)>;
      kernel<<<blocks_for<kernel>(work), kThreads, 0, stream>>>(xs, a.delta, gs, os, p, steps);
      check_launch();
    }
    begin = steps * kRgbUnit;
    if (begin == a.numel) return;
  }
  const bool vectorized = !rgb && aligned(a.x, pack_alignment<XT, kVec>()) &&
                          aligned(a.delta, pack_alignment<float, kVec>()) && aligned(grad, pack_alignment<GT, kVec>()) &&
                          aligned(out, pack_alignment<OT, kVec>());
  const int64_t rest = a.numel - begin;
  constexpr auto general = perturb_kernel<XT, GT, OT, kUpdate, kMode>;
  general<<<blocks_for<general>(vectorized ? (rest + kVec - 1) / kVec : rest), kThreads, 0, stream>>>(
      xs, a.delta, gs, os, p, begin, a.numel, vectorized);
  check_launch();
}

// Calls f with the pixel mode as a compile-time constant; without an update
// the two clamp modes make the same input.
template <typename F>
void with_mode(PixelMode mode, bool update, F&& f) {
  using M = PixelMode;
  switch (mode) {
    case M::Project: return f(std::integral_constant<M, M::Project>{});
    case M::ClampInputStrict:
      if (update) return f(std::integral_constant<M, M::ClampInputStrict>{});
      [[fallthrough]];
    case M::ClampInput: return f(std::integral_constant<M, M::ClampInput>{});
  }
  throw std::invalid_argument("freeadv perturb (cuda): unknown pixel mode");
}

template <typename XT>
void dispatch(const PerturbArgs& a, cudaStream_t s) {
  with_mode(a.mode, a.update, [&](auto mode) {
    constexpr PixelMode kMode = decltype(mode)::value;
    if (!a.update) {
      with_float_type(a.out_dtype, [&](auto o) {
        launch<XT, NoTensor, typename decltype(o)::type, false, kMode>(a, nullptr, a.out, s);
      });
    } else if (a.out == nullptr) {
      with_float_type(a.grad_dtype, [&](auto g) {
        launch<XT, typename decltype(g)::type, NoTensor, true, kMode>(a, a.grad, nullptr, s);
      });
    } else if (a.grad_dtype == a.out_dtype) {
      // The between-replays op: one pass over memory.
      with_float_type(a.grad_dtype, [&](auto g) {
        using T = typename decltype(g)::type;
        launch<XT, T, T, true, kMode>(a, a.grad, a.out, s);
      });
    } else {
      // Mixed grad/out dtypes are rare; two passes keep the instantiations few.
      PerturbArgs update_only = a;
      update_only.out = nullptr;
      update_only.out_dtype = DType::None;
      dispatch<XT>(update_only, s);
      PerturbArgs make_only = a;
      make_only.update = false;
      dispatch<XT>(make_only, s);
    }
  });
}

}  // namespace

void perturb_cuda(const PerturbArgs& a, void* stream) {
  if (a.numel == 0 || (!a.update && a.out == nullptr)) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.x_dtype == DType::U8)
    dispatch<uint8_t>(a, s);
  else if (a.x_dtype == DType::F32)
    dispatch<float>(a, s);
  else
    throw std::invalid_argument("freeadv perturb (cuda): x must be uint8 or float32");
}

}  // namespace freeadv
