"""Free-m's input gradient without autograd's slow last step.

Natural training stops its backward at the first convolution's weights;
free-m also needs d loss / d input, the data gradient of that convolution
back to 3 channels. cuDNN's kernel for 3 channels is slow: at ResNet-50 224
px bf16 on an H100 it cost 3.6 ms of a 65 ms forward and backward
(bench/stem_grad.py; its printed figures are in
bench/results/gpu-check-h100/runs.txt), nearly all of free-4's 5% gap to
natural training.

``use_fast_input_grad(model, how)`` gives the model's stem convolution a
backward of its own (``StemConv2d``: the same forward, the same weight and
bias gradients, the same state_dict) whose input gradient is made one of
INPUT_GRADS ways:

- "padded": cuDNN's data gradient with the weight padded with zero input
  channels to 4. Timed alone it took 1.9 ms instead of 3.6, but in the
  graphed training step (then made from a hook on the stem's output) it did
  not pay: 0.934 of natural against 0.947 with autograd, never explained.
- "subpixel": a stride-s data gradient as one stride-1 convolution of the
  output gradient to 3*s*s channels (one per input-pixel phase) and a pixel
  shuffle, which widens cuDNN's GEMM from 3 to 12 at ResNet-50's stride 2.

Both equal autograd's gradient up to the order of the sums (exactly in
float64, tests/test_stem.py), and autograd carries it on through whatever
comes before the stem, so any model is right. Neither has been measured in
this form on a GPU, so both are opt-in (``stem_input_grad=``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PADDED_CHANNELS = 4


def stem_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first 3-channel 2-D convolution of ``model`` if StemConv2d can
    take its place: a plain nn.Conv2d (not a subclass with a forward of its
    own), ungrouped, undilated, zero padding given in pixels."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            plain = (type(m) in (nn.Conv2d, StemConv2d) and m.groups == 1 and m.padding_mode == "zeros"
                     and tuple(m.dilation) == (1, 1) and not isinstance(m.padding, str))
            return m if plain else None
    return None


def padded_input_grad(weight, gy, stride, padding, size) -> torch.Tensor:
    """cuDNN's data gradient with ``weight`` padded with zero input channels
    to PADDED_CHANNELS (the first 3 channels' sums are unchanged)."""
    w = F.pad(weight, (0, 0, 0, 0, 0, PADDED_CHANNELS - weight.shape[1]))
    g = torch.nn.grad.conv2d_input((size[0], PADDED_CHANNELS, *size[2:]),
                                   w.contiguous(memory_format=torch.channels_last), gy, stride, padding)
    return g[:, :size[1]]


def _phases(k: int, s: int, p: int):
    """One spatial dimension of a stride-``s`` convolution's data gradient as
    ``s`` stride-1 correlations: input pixel ``s*u + a`` gets
    ``sum_t gy[u + q - t] * w[r + s*t]``. Returns (jmin, width, [(q, r, taps)
    for each phase a]), where j = q - t runs over jmin .. jmin + width - 1."""
    phases = [((a + p) // s, (a + p) % s, len(range((a + p) % s, k, s))) for a in range(s)]
    jmin = min(q - taps + 1 for q, _, taps in phases if taps)
    return jmin, max(q for q, _, taps in phases if taps) - jmin + 1, phases


def subpixel_input_grad(weight, gy, stride, padding, size) -> torch.Tensor:
    """The data gradient of a stride-s convolution as one stride-1 convolution
    of ``gy`` with s*s*3 output channels (each input-pixel phase is a
    correlation with a subset of the taps), then a pixel shuffle. Slices, not
    index tensors, build the weight: nothing is copied from the host, so it
    can be captured in a CUDA graph."""
    (kh, kw), (sh, sw), (ph, pw) = weight.shape[2:], stride, padding
    n, c, h, w = size
    uh, uw = -(-h // sh), -(-w // sw)  # input pixels per phase
    gh, gw = gy.shape[2:]
    (jh, lh, phases_h), (jw, lw, phases_w) = _phases(kh, sh, ph), _phases(kw, sw, pw)
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


class _Conv(torch.autograd.Function):
    """conv2d whose backward makes the input gradient by INPUT_GRADS[how].
    Autocast is applied here by hand (what it would do to conv2d: both
    operands in its dtype), so that the backward has the operands the
    forward used."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, how):
        kind = x.device.type
        cast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        xc, wc, bc = (t.to(cast) if cast is not None and t is not None else t for t in (x, weight, bias))
        with torch.autocast(kind, enabled=False):
            y = F.conv2d(xc, wc, bc, stride, padding)
        ctx.save_for_backward(xc, wc)
        ctx.conv = (stride, padding, how, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, wc = ctx.saved_tensors
        stride, padding, how, x_dtype, w_dtype, b_dtype = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_w or need_b:
            _, gw, gb = torch.ops.aten.convolution_backward(
                gy, xc, wc, [wc.shape[0]] if b_dtype is not None else None, list(stride), list(padding), [1, 1],
                False, [0, 0], 1, [False, need_w, need_b])
            gw = gw.to(w_dtype) if need_w else None
            gb = gb.to(b_dtype) if need_b else None
        if need_x:
            gx = INPUT_GRADS[how](wc, gy, stride, padding, tuple(xc.shape)).to(x_dtype)
            channels_last = xc.is_contiguous(memory_format=torch.channels_last) and not xc.is_contiguous()
            gx = gx.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return gx, gw, gb, None, None, None


class StemConv2d(nn.Conv2d):
    """nn.Conv2d whose input gradient comes from INPUT_GRADS[self.input_grad]
    (the module's class is swapped in place: parameters, hooks and
    state_dict stay as they are)."""
    input_grad = "autograd"

    def forward(self, x):
        if self.input_grad == "autograd":
            return super().forward(x)
        return _Conv.apply(x, self.weight, self.bias, tuple(self.stride), tuple(self.padding), self.input_grad)


def use_fast_input_grad(model: nn.Module, how: str) -> bool:
    """Makes ``model``'s stem convolution (stem_conv) a StemConv2d with input
    gradients made by ``how`` ("autograd" undoes it); False if the model has
    no such convolution."""
    if how != "autograd" and how not in INPUT_GRADS:
        raise ValueError(f"stem input gradient must be autograd or one of {', '.join(INPUT_GRADS)}, got {how!r}")
    conv = stem_conv(model)
    if conv is None:
        return False
    if how != "autograd" or isinstance(conv, StemConv2d):
        conv.__class__ = StemConv2d
        conv.input_grad = how
    return True
