// The one fused perturbation kernel, as seen by host code.
//
// Shared by the CPU implementation (csrc/perturb_cpu.cpp), the CUDA
// implementation (kernels/perturb.cu) and the torch.library glue (csrc/ops.cpp).
// No torch headers here on purpose: the .cu file includes this and stays a
// plain CUDA translation unit, which keeps nvcc fast for every architecture.
//
// The semantics are those of freeadv_fast/ops/reference.py, which is the spec.
#pragma once

#include <cstdint>

namespace freeadv {

// ClampInput masks the gradient where x + delta is outside [lo, hi] or on a
// bound (the paper's code as it ran: autograd of clamp gave subgradient 1 at
// the bounds from torch 0.4.1 until 2026); ClampInputStrict masks the bounds
// too (torch's clamp gradient since then).
enum class PixelMode : int32_t { ClampInput = 0, Project = 1, ClampInputStrict = 2 };

// Element types the kernels read and write. Any other input dtype is
// converted by the Python wrapper first (exactly what the reference does).
enum class DType : int32_t { None = 0, U8, F32, F16, BF16 };

struct PerturbArgs {
  // All tensors share one dense layout; element i of every tensor is the
  // same pixel. Its channel is (i / channel_stride) % channels.
  const void* x = nullptr;     // clean batch: U8 (read as x / 255) or F32
  DType x_dtype = DType::None;
  float* delta = nullptr;      // perturbation, pixel units, updated in place
  const void* grad = nullptr;  // d loss / d model input, may be null
  DType grad_dtype = DType::None;
  void* out = nullptr;         // next model input, may be null
  DType out_dtype = DType::None;

  // Per-channel parameters, `channels` floats each, on the tensors' device.
  const float* step = nullptr;
  const float* eps = nullptr;
  const float* mean = nullptr;
  const float* std = nullptr;

  float lo = 0.f, hi = 1.f;
  int64_t numel = 0;
  int64_t channels = 1;
  int64_t channel_stride = 1;
  PixelMode mode = PixelMode::ClampInput;
  // update: delta <- clip(delta + step * sign(grad) [* mask], -eps, eps)
  // (projected into the pixel range in Project mode); with no grad the sign
  // is zero, which leaves only the clip and projection (used by random init).
  bool update = false;
};

void perturb_cpu(const PerturbArgs& args);

#ifdef FREEADV_WITH_CUDA
// `stream` is a cudaStream_t; void* keeps cuda_runtime.h out of this header.
void perturb_cuda(const PerturbArgs& args, void* stream);
#endif

}  // namespace freeadv
