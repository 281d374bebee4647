"""Free-m's input gradient without autograd's slow last step.

Natural training stops its backward at the first convolution's weights;
free-m also needs d loss / d input, the data gradient of that convolution
back to 3 channels. cuDNN's kernel for 3 channels is slow: at ResNet-50 224
px bf16 on an H100 it cost 3.6 ms of a 65 ms forward and backward
(bench/stem_grad.py; its printed figures are in
bench/results/gpu-check-h100/runs.txt). The same gradient from the convolution's
output gradient with the weight padded with zero input channels to 4 cost
1.9 ms, and gave the same signs. ``StemInputGrad`` does that: a hook keeps the
stem's output gradient during the one backward, and ``input_grad`` turns it
into the input gradient, by one of INPUT_GRADS: "padded" (the above) or
"subpixel" (a stride-s data gradient as one stride-1 convolution to s*s*3
channels and a pixel shuffle, which widens cuDNN's GEMM from 3 to 12 at
ResNet-50's stride 2; exact against autograd, unmeasured on a GPU).

It applies when the model's first 3-channel convolution is what the input
goes into (checked on every step: the hook compares the tensor it sees with
the input handed in). Both are opt-in (``stem_input_grad=``): "padded", in the
training step itself (bench/train_step.py, graphed free-4 against natural on
the same H100) it did not pay: 0.93 of natural with it, against 0.95 with
autograd in the run before; why the saving measured alone does not reach the
step is still to be profiled.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PADDED_CHANNELS = 4


def stem_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first 3-channel 2-D convolution of ``model`` if it is one that
    INPUT_GRADS handle (ungrouped, undilated, zero padding given in pixels)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            plain = (m.groups == 1 and m.padding_mode == "zeros" and tuple(m.dilation) == (1, 1)
                     and not isinstance(m.padding, str))
            return m if plain else None
    return None


def padded_input_grad(conv: nn.Conv2d, gy: torch.Tensor, size) -> torch.Tensor:
    """cuDNN's data gradient with the weight padded with zero input channels
    to PADDED_CHANNELS (the first 3 channels' sums are unchanged)."""
    w = conv.weight.detach().to(gy.dtype)
    w = F.pad(w, (0, 0, 0, 0, 0, PADDED_CHANNELS - w.shape[1]))
    g = torch.nn.grad.conv2d_input((size[0], PADDED_CHANNELS, *size[2:]),
                                   w.contiguous(memory_format=torch.channels_last), gy, conv.stride, conv.padding,
                                   conv.dilation, conv.groups)
    return g[:, :size[1]]


def _phases(k: int, s: int, p: int):
    """One spatial dimension of a stride-``s`` convolution's data gradient as
    ``s`` stride-1 correlations: input pixel ``s*u + a`` gets
    ``sum_t gy[u + q - t] * w[r + s*t]``. Returns (jmin, width, [(q, r, taps)
    for each phase a]), where j = q - t runs over jmin .. jmin + width - 1."""
    phases = [((a + p) // s, (a + p) % s, len(range((a + p) % s, k, s))) for a in range(s)]
    jmin = min(q - taps + 1 for q, _, taps in phases if taps)
    return jmin, max(q for q, _, taps in phases if taps) - jmin + 1, phases


def subpixel_input_grad(conv: nn.Conv2d, gy: torch.Tensor, size) -> torch.Tensor:
    """The data gradient of a stride-s convolution as one stride-1 convolution
    of ``gy`` with s*s*3 output channels (each input-pixel phase is a
    correlation with a subset of the taps), then a pixel shuffle. The GEMM's
    narrow side grows from 3 to 3*s*s, which is what makes cuDNN's 3-channel
    data gradient slow. Slices, not index tensors, build the weight: nothing
    is copied from the host, so it can be captured in a CUDA graph."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    n, c, h, w = size
    uh, uw = -(-h // sh), -(-w // sw)  # input pixels per phase
    gh, gw = gy.shape[2:]
    (jh, lh, phases_h), (jw, lw, phases_w) = _phases(kh, sh, ph), _phases(kw, sw, pw)
    weight = conv.weight.detach().to(gy.dtype)
    sub = gy.new_zeros(c, sh, sw, weight.shape[0], lh, lw)
    for ah, (qh, rh, th) in enumerate(phases_h):
        for aw, (qw, rw, tw) in enumerate(phases_w):
            if th and tw:  # taps in ascending j = q - t: the strided slice reversed
                sub[:, ah, aw, :, qh - th + 1 - jh:qh + 1 - jh, qw - tw + 1 - jw:qw + 1 - jw] = \
                    weight[:, :, rh::sh, rw::sw].flip(2, 3).transpose(0, 1)
    sub = sub.reshape(c * sh * sw, -1, lh, lw)
    channels_last = gy.is_contiguous(memory_format=torch.channels_last) and not gy.is_contiguous()
    if channels_last:
        sub = sub.contiguous(memory_format=torch.channels_last)
    # symmetric padding that covers gy[u + j] for every u and j; the output is cropped after
    pad_h = max(-jh, jh + lh - 1 + uh - gh, 0)
    pad_w = max(-jw, jw + lw - 1 + uw - gw, 0)
    out = F.conv2d(gy, sub, padding=(pad_h, pad_w))
    out = out[:, :, jh + pad_h:jh + pad_h + uh, jw + pad_w:jw + pad_w + uw].unflatten(1, (c, sh, sw))
    if channels_last:  # (n, c, sh, sw, uh, uw) -> n, uh, sh, uw, sw, c: one copy into the NHWC result
        return out.permute(0, 4, 2, 5, 3, 1).reshape(n, uh * sh, uw * sw, c)[:, :h, :w].permute(0, 3, 1, 2)
    return out.permute(0, 1, 4, 2, 5, 3).reshape(n, c, uh * sh, uw * sw)[:, :, :h, :w]


INPUT_GRADS = {"padded": padded_input_grad, "subpixel": subpixel_input_grad}


class StemInputGrad:
    def __init__(self, conv: nn.Conv2d, how: str = "padded"):
        self.conv = conv
        self._make = INPUT_GRADS[how]
        self._expect = None  # the input tensor of the current step
        self._grad_out = None
        conv.register_forward_hook(self._catch)

    def _catch(self, module, inputs, output):
        if self._expect is not None and inputs[0] is self._expect and output.requires_grad:
            output.register_hook(self._keep)

    def _keep(self, grad):
        self._grad_out = grad

    def expect(self, inp: torch.Tensor):
        """Call before the forward: the hook watches for this input."""
        self._expect, self._grad_out = inp, None

    def input_grad(self, inp: torch.Tensor) -> torch.Tensor | None:
        """After the backward: d loss / d ``inp`` (None if the stem never saw it)."""
        gy, self._expect, self._grad_out = self._grad_out, None, None
        if gy is None:
            return None
        g = self._make(self.conv, gy, tuple(inp.shape))
        fmt = torch.channels_last if inp.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return g.to(inp.dtype).contiguous(memory_format=fmt)
