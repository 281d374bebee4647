// torch.library registration of the fused perturbation op and its dispatch
// to the CPU and CUDA implementations.
//
//   freeadv_fast::perturb(x, delta!, grad?, out!?, step, eps, mean, std,
//                         lo, hi, mode, update) -> ()
//
// One op covers make_input (no update, out), update_delta_ (update, no out),
// update_and_make_input_ (both) and the projection after a random start
// (update, no grad). The Python wrapper (freeadv_fast/ops) prepares layouts and
// parameters; the checks here keep direct torch.ops calls safe too.
#include "perturb.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#ifdef FREEADV_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace freeadv {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kByte: return DType::U8;
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: return DType::None;
  }
}

bool same_layout(const at::Tensor& t, at::MemoryFormat fmt) { return t.is_contiguous(fmt); }

PerturbArgs make_args(const at::Tensor& x, const at::Tensor& delta, const std::optional<at::Tensor>& grad,
                      const std::optional<at::Tensor>& out, const at::Tensor& step, const at::Tensor& eps,
                      const at::Tensor& mean, const at::Tensor& std, double lo, double hi, int64_t mode,
                      bool update) {
  TORCH_CHECK(x.dim() >= 2, "freeadv perturb: x must have a channel dimension (dim 1), got shape ", x.sizes());
  TORCH_CHECK(delta.sizes() == x.sizes(), "freeadv perturb: delta shape ", delta.sizes(), " != x shape ", x.sizes());
  TORCH_CHECK(delta.scalar_type() == at::kFloat, "freeadv perturb: delta must be float32");
  TORCH_CHECK(x.scalar_type() == at::kByte || x.scalar_type() == at::kFloat,
              "freeadv perturb: x must be uint8 or float32, got ", x.scalar_type());
  TORCH_CHECK(mode >= 0 && mode <= 2,
              "freeadv perturb: mode must be 0 (clamp_input), 1 (project) or 2 (clamp_input_strict)");

  // One dense layout for all: contiguous, or channels_last for 4-D tensors.
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  if (!delta.is_contiguous() && x.dim() == 4 && delta.is_contiguous(at::MemoryFormat::ChannelsLast))
    fmt = at::MemoryFormat::ChannelsLast;
  const int64_t channels = x.size(1);
  int64_t channel_stride = 1;
  if (fmt == at::MemoryFormat::Contiguous)
    for (int64_t d = 2; d < x.dim(); ++d) channel_stride *= x.size(d);

  auto check_tensor = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device(), "freeadv perturb: ", name, " is on ", t.device(), ", x on ", x.device());
    TORCH_CHECK(t.sizes() == x.sizes(), "freeadv perturb: ", name, " shape ", t.sizes(), " != x shape ", x.sizes());
    TORCH_CHECK(same_layout(t, fmt), "freeadv perturb: ", name, " must share delta's dense memory layout");
  };
  check_tensor(delta, "delta");
  auto check_param = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == x.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.numel() == channels,
                "freeadv perturb: ", name, " must be a contiguous float32 tensor of ", channels,
                " values on ", x.device());
  };
  check_param(step, "step");
  check_param(eps, "eps");
  check_param(mean, "mean");
  check_param(std, "std");

  PerturbArgs a;
  a.x = x.data_ptr();
  a.x_dtype = dtype_of(x);
  a.delta = delta.data_ptr<float>();
  if (grad.has_value()) {
    check_tensor(*grad, "grad");
    a.grad = grad->data_ptr();
    a.grad_dtype = dtype_of(*grad);
    TORCH_CHECK(a.grad_dtype == DType::F32 || a.grad_dtype == DType::F16 || a.grad_dtype == DType::BF16,
                "freeadv perturb: grad must be float32, float16 or bfloat16, got ", grad->scalar_type());
  }
  if (out.has_value()) {
    check_tensor(*out, "out");
    a.out = out->data_ptr();
    a.out_dtype = dtype_of(*out);
    TORCH_CHECK(a.out_dtype == DType::F32 || a.out_dtype == DType::F16 || a.out_dtype == DType::BF16,
                "freeadv perturb: out must be float32, float16 or bfloat16, got ", out->scalar_type());
  }
  a.step = step.data_ptr<float>();
  a.eps = eps.data_ptr<float>();
  a.mean = mean.data_ptr<float>();
  a.std = std.data_ptr<float>();
  a.lo = static_cast<float>(lo);
  a.hi = static_cast<float>(hi);
  a.numel = x.numel();
  a.channels = channels;
  a.channel_stride = channel_stride;
  a.mode = static_cast<PixelMode>(mode);
  a.update = update;
  return a;
}

void perturb_cpu_op(const at::Tensor& x, const at::Tensor& delta, const std::optional<at::Tensor>& grad,
                    const std::optional<at::Tensor>& out, const at::Tensor& step, const at::Tensor& eps,
                    const at::Tensor& mean, const at::Tensor& std, double lo, double hi, int64_t mode,
                    bool update) {
  perturb_cpu(make_args(x, delta, grad, out, step, eps, mean, std, lo, hi, mode, update));
}

#ifdef FREEADV_WITH_CUDA
void perturb_cuda_op(const at::Tensor& x, const at::Tensor& delta, const std::optional<at::Tensor>& grad,
                     const std::optional<at::Tensor>& out, const at::Tensor& step, const at::Tensor& eps,
                     const at::Tensor& mean, const at::Tensor& std, double lo, double hi, int64_t mode,
                     bool update) {
  const c10::DeviceGuard guard(x.device());
  const PerturbArgs a = make_args(x, delta, grad, out, step, eps, mean, std, lo, hi, mode, update);
  perturb_cuda(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
}
#endif

// Shapes never change and nothing is returned, so tracing needs no work.
void perturb_meta_op(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, double, double, int64_t, bool) {}

}  // namespace
}  // namespace freeadv

TORCH_LIBRARY(freeadv_fast, m) {
  m.def(
      "perturb(Tensor x, Tensor(a!) delta, Tensor? grad, Tensor(b!)? out, Tensor step, Tensor eps, "
      "Tensor mean, Tensor std, float lo, float hi, int pixel_mode, bool update) -> ()");
}

TORCH_LIBRARY_IMPL(freeadv_fast, CPU, m) { m.impl("perturb", &freeadv::perturb_cpu_op); }
TORCH_LIBRARY_IMPL(freeadv_fast, Meta, m) { m.impl("perturb", &freeadv::perturb_meta_op); }
#ifdef FREEADV_WITH_CUDA
TORCH_LIBRARY_IMPL(freeadv_fast, CUDA, m) { m.impl("perturb", &freeadv::perturb_cuda_op); }
#endif
