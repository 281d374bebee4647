// CUDA implementation of the fused perturbation kernel (see csrc/perturb.h and
// the spec in freeadv_fast/ops/reference.py).
//
// Plain CUDA, no torch headers: the host glue in csrc/ops.cpp hands over raw
// pointers and the stream. The op is streaming (13 bytes an element for
// uint8 x, float32 delta and 16-bit grad and out) with two correctly rounded
// divisions an element (x / 255 and the normalisation, exact as the spec
// asks): each thread takes a pack of x (FREEADV_X_PACK_BYTES) with vector
// loads and stores of every tensor (16 bytes where the pack is that large),
// in a grid-stride loop over enough resident blocks to fill the GPU; the
// per-channel constants and the 256 uint8 quotients live in shared memory,
// and the channel of each element is walked from one division per pack. A
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

// Tuning knobs, measured with bench/kernel_variants.sh (one binary per
// setting; bench/results/kernel-variants-h200.jsonl). The defaults were the
// fastest of the eight on an H200 at the ImageNet batch, 20 calls in a
// graph: 0.145 ms (83% of a copy's bandwidth) against 0.149-0.170 ms for
// the others. The table saves one of the two correctly rounded divisions
// an element needs; 16-byte packs of uint8 x (64 bytes of delta a thread)
// were slower than 4-byte ones (16 bytes of delta).
#ifndef FREEADV_X_PACK_BYTES  // bytes of x per pack and thread
#define FREEADV_X_PACK_BYTES 4
#endif
#ifndef FREEADV_FULL_GRID  // 1: a thread per pack; 0: grid-stride loop over resident blocks
#define FREEADV_FULL_GRID 0
#endif
#ifndef FREEADV_U8_LUT  // 1: uint8 / 255 from a table of the 256 exact quotients in shared memory
#define FREEADV_U8_LUT 1
#endif

// Correctly rounded division, matching the fp32 reference bit for bit even if
// a build adds --use_fast_math.
__device__ __forceinline__ float to_float(uint8_t v) { return __fdiv_rn(static_cast<float>(v), 255.0f); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kVec elements of one tensor, moved with 16-byte accesses where the pack is
// at least 16 bytes (and with one narrower access otherwise).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec >= 16 ? 16 : sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  constexpr int kBytes = sizeof(T) * kVec;
  Pack<T, kVec> r;
  if constexpr (kBytes >= 16 && kBytes % 16 == 0) {
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k)
      reinterpret_cast<uint4*>(&r)[k] = __ldg(reinterpret_cast<const uint4*>(p) + k);
  } else {
    r = *reinterpret_cast<const Pack<T, kVec>*>(p);
  }
  return r;
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& v) {
  constexpr int kBytes = sizeof(T) * kVec;
  if constexpr (kBytes >= 16 && kBytes % 16 == 0) {
#pragma unroll
    for (int k = 0; k < kBytes / 16; ++k)
      reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(&v)[k];
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
  bool project;
  bool strict;   // ClampInputStrict: the bounds themselves masked
  bool index32;  // numel < 2^32: cheaper 32-bit index arithmetic
};

// The per-channel constants, in shared memory when they fit (and the uint8
// quotient table, with FREEADV_U8_LUT).
struct Constants {
  const float* step;
  const float* eps;
  const float* mean;
  const float* std;
  const float* u8;
};

constexpr int kSharedFloats = 4 * kMaxSharedChannels + (FREEADV_U8_LUT ? 256 : 0);

__device__ __forceinline__ Constants load_constants(const Params& p, float* smem) {
  float* lut = smem + 4 * kMaxSharedChannels;
  if (FREEADV_U8_LUT)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) lut[i] = __fdiv_rn(static_cast<float>(i), 255.0f);
  const bool shared = p.channels <= kMaxSharedChannels;
  if (shared) {
    const int c = static_cast<int>(p.channels);
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
      smem[i] = p.step[i];
      smem[kMaxSharedChannels + i] = p.eps[i];
      smem[2 * kMaxSharedChannels + i] = p.mean[i];
      smem[3 * kMaxSharedChannels + i] = p.std[i];
    }
  }
  __syncthreads();
  if (!shared) return {p.step, p.eps, p.mean, p.std, lut};
  return {smem, smem + kMaxSharedChannels, smem + 2 * kMaxSharedChannels, smem + 3 * kMaxSharedChannels, lut};
}

// x in pixel units: the exact quotient for uint8, as the reference's x / 255.
__device__ __forceinline__ float pixel(const Constants& k, uint8_t v) {
  return FREEADV_U8_LUT ? k.u8[v] : to_float(v);
}
__device__ __forceinline__ float pixel(const Constants&, float v) { return v; }

__device__ __forceinline__ int64_t channel_of(const Params& p, int64_t i) {
  if (p.index32)
    return (static_cast<uint32_t>(i) / static_cast<uint32_t>(p.channel_stride)) %
           static_cast<uint32_t>(p.channels);
  return (i / p.channel_stride) % p.channels;
}

__device__ __forceinline__ float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The spec for one element: updates d in place (if kUpdate) and returns the
// normalised model input made from the (new) delta.
template <bool kUpdate>
__device__ __forceinline__ float element(const Params& p, const Constants& k, int64_t c, float xv, float& d,
                                         float sign) {
  if (kUpdate) {
    const float e = k.eps[c];
    if (p.project) {
      d = clampf(d + k.step[c] * sign, -e, e);
      d = clampf(xv + d, p.lo, p.hi) - xv;
    } else {
      const float s = xv + d;
      const bool inside = p.strict ? (s > p.lo && s < p.hi) : (s >= p.lo && s <= p.hi);
      d = clampf(d + k.step[c] * sign * (inside ? 1.f : 0.f), -e, e);
    }
  }
  float v = xv + d;
  if (!p.project) v = clampf(v, p.lo, p.hi);
  return __fdiv_rn(v - k.mean[c], k.std[c]);
}

template <typename GT>
__device__ __forceinline__ float sign_of(GT g) {
  if constexpr (std::is_same_v<GT, NoTensor>) {
    return 0.f;
  } else {
    const float f = to_float(g);
    return static_cast<float>((f > 0.f) - (f < 0.f));  // sign(NaN) = 0
  }
}

// 16 bytes of x per pack: 16 uint8 pixels or 4 float32 ones.
template <typename XT>
struct VecOf {
  static constexpr int value =
      FREEADV_X_PACK_BYTES >= static_cast<int>(sizeof(XT)) ? FREEADV_X_PACK_BYTES / static_cast<int>(sizeof(XT)) : 1;
};

template <typename XT, typename GT, typename OT, bool kUpdate>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const XT* __restrict__ x, float* __restrict__ delta, const GT* __restrict__ grad,
                   OT* __restrict__ out, Params p, int64_t numel, bool vectorized) {
  constexpr int kVec = VecOf<XT>::value;
  constexpr bool kGrad = !std::is_same_v<GT, NoTensor>;
  constexpr bool kOut = !std::is_same_v<OT, NoTensor>;
  __shared__ float smem[kSharedFloats];
  const Constants k = load_constants(p, smem);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  const int64_t vec_end = vectorized ? numel / kVec * kVec : 0;
  for (int64_t base = tid * kVec; base < vec_end; base += stride * kVec) {
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
      const float o = element<kUpdate>(p, k, c, pixel(k, xp.v[j]), dp.v[j], sign_of<GT>(gp.v[j]));
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
    float sign = 0.f;
    if constexpr (kGrad) sign = sign_of<GT>(grad[i]);
    const float o = element<kUpdate>(p, k, channel_of(p, i), pixel(k, x[i]), d, sign);
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

bool aligned(const void* ptr, size_t bytes) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, int kVec>
constexpr size_t pack_alignment() {
  return std::is_same_v<T, NoTensor> ? 1 : (sizeof(T) * kVec < 16 ? sizeof(T) * kVec : 16);
}

template <typename XT, typename GT, typename OT, bool kUpdate>
void launch(const PerturbArgs& a, const void* grad, void* out, cudaStream_t stream) {
  constexpr int kVec = VecOf<XT>::value;
  Params p{a.step, a.eps, a.mean, a.std, a.lo, a.hi, a.channels, a.channel_stride,
           a.mode == PixelMode::Project, a.mode == PixelMode::ClampInputStrict, a.numel < (int64_t(1) << 32)};
  const bool vectorized = aligned(a.x, pack_alignment<XT, kVec>()) && aligned(a.delta, pack_alignment<float, kVec>()) &&
                          aligned(grad, pack_alignment<GT, kVec>()) && aligned(out, pack_alignment<OT, kVec>());
  const int64_t work = vectorized ? (a.numel + kVec - 1) / kVec : a.numel;
  // FULL_GRID 0: enough resident blocks to saturate memory, the grid-stride loop does the rest.
  const int64_t max_blocks = FREEADV_FULL_GRID ? int64_t(1) << 30 : int64_t(multiprocessors()) * 2048 / kThreads;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
  perturb_kernel<XT, GT, OT, kUpdate><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const XT*>(a.x), a.delta, static_cast<const GT*>(grad), static_cast<OT*>(out), p, a.numel,
      vectorized);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("freeadv perturb (cuda): launch failed: ") + cudaGetErrorString(err));
}

template <typename XT>
void dispatch(const PerturbArgs& a, cudaStream_t s) {
  if (!a.update) {
    with_float_type(a.out_dtype, [&](auto o) { launch<XT, NoTensor, typename decltype(o)::type, false>(a, nullptr, a.out, s); });
  } else if (a.out == nullptr) {
    with_float_type(a.grad_dtype, [&](auto g) { launch<XT, typename decltype(g)::type, NoTensor, true>(a, a.grad, nullptr, s); });
  } else if (a.grad_dtype == a.out_dtype) {
    // The between-replays op: one pass over memory.
    with_float_type(a.grad_dtype, [&](auto g) {
      using T = typename decltype(g)::type;
      launch<XT, T, T, true>(a, a.grad, a.out, s);
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
