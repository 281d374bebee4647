// C++ test of the registered op freeadv_fast::perturb on CPU tensors, run by
// CTest. It calls the op through the dispatcher, as torch.ops does, and checks
// it against the spec (freeadv_fast/ops/reference.py) written with ATen ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>

namespace {

using PerturbFn = void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                       const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, double, double, int64_t, bool);

int failures = 0, passes = 0;

void check(bool ok, const char* what) {
  if (ok) {
    ++passes;
  } else {
    ++failures;
    std::printf("FAILED: %s\n", what);
  }
}

at::Tensor channel(const at::Tensor& v, int64_t dims) {
  std::vector<int64_t> shape(dims, 1);
  shape[1] = v.numel();
  return v.reshape(shape);
}

void run_case(at::MemoryFormat fmt, bool uint8_x, int64_t mode) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("freeadv_fast::perturb", "").typed<PerturbFn>();
  at::manual_seed(uint8_x * 10 + mode);
  const double lo = 0.0, hi = 1.0;
  at::Tensor x = uint8_x ? at::randint(0, 256, {5, 3, 7, 9}, at::kByte) : at::rand({5, 3, 7, 9});
  x = x.contiguous(fmt);
  at::Tensor xf = uint8_x ? x.to(at::kFloat) / 255 : x;
  const at::Tensor eps = at::tensor({4.f / 255, 8.f / 255, 2.f / 255});
  const at::Tensor step = at::tensor({1.f / 255, 2.f / 255, 3.f / 255});
  const at::Tensor mean = at::tensor({0.485f, 0.456f, 0.406f});
  const at::Tensor std = at::tensor({0.229f, 0.224f, 0.225f});
  at::Tensor delta = ((at::rand({5, 3, 7, 9}) * 2 - 1) * channel(eps, 4)).contiguous(fmt);
  at::Tensor grad = at::randn({5, 3, 7, 9}).contiguous(fmt);
  grad.masked_fill_(at::rand(grad.sizes()) < 0.2, 0.0);  // zero gradients too

  // the spec
  const at::Tensor e = channel(eps, 4), s = channel(step, 4);
  at::Tensor expected;
  const bool clamping = mode != 1;  // 0: clamp_input (bounds let through), 2: clamp_input_strict
  if (clamping) {
    const at::Tensor a = xf + delta;
    const at::Tensor mask = mode == 2 ? at::logical_and(a > lo, a < hi) : at::logical_and(a >= lo, a <= hi);
    expected = at::clamp(delta + s * at::sign(grad) * mask, -e, e);
  } else {
    expected = at::clamp(delta + s * at::sign(grad), -e, e);
    expected = at::clamp(xf + expected, lo, hi) - xf;
  }
  at::Tensor pixels = xf + expected;
  if (clamping) pixels = at::clamp(pixels, lo, hi);
  const at::Tensor expected_out = (pixels - channel(mean, 4)) / channel(std, 4);

  at::Tensor out = at::empty_like(delta);
  op.call(x, delta, grad, out, step, eps, mean, std, lo, hi, mode, true);
  check(clamping ? at::equal(delta, expected) : at::allclose(delta, expected, 0.0, 1e-6),
        "delta update matches the spec");
  check(at::allclose(out, expected_out, 0.0, 1e-6), "model input matches the spec");

  at::Tensor bf16 = at::empty_like(delta, at::kBFloat16);
  op.call(x, delta, std::nullopt, bf16, step, eps, mean, std, lo, hi, mode, false);
  pixels = xf + delta;
  if (clamping) pixels = at::clamp(pixels, lo, hi);
  check(at::equal(bf16, ((pixels - channel(mean, 4)) / channel(std, 4)).to(at::kBFloat16)),
        "bf16 model input equals the spec rounded to bf16");
}

}  // namespace

int main() {
  for (auto fmt : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast})
    for (bool u8 : {true, false})
      for (int64_t mode : {0, 1, 2}) run_case(fmt, u8, mode);
  std::printf("%d passed, %d failed\n", passes, failures);
  return failures == 0 ? 0 : 1;
}
