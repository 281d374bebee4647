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
into the input gradient.

It applies when the model's first 3-channel convolution is what the input
goes into (checked on every step: the hook compares the tensor it sees with
the input handed in). It is opt-in (``stem_input_grad="padded"``): in the
training step itself (bench/train_step.py, graphed free-4 against natural on
the same H100) it did not pay: 0.93 of natural with it, against 0.95 with
autograd in the run before; why the saving measured alone does not reach the
step is still to be profiled.
"""
from __future__ import annotations

import torch
import torch.nn as nn

PADDED_CHANNELS = 4


def stem_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first 3-channel, ungrouped 2-D convolution of ``model``, if any."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1 and m.padding_mode == "zeros":
            return m
    return None


class StemInputGrad:
    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
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
        c = self.conv
        w = c.weight.detach().to(gy.dtype)
        w = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, PADDED_CHANNELS - w.shape[1]))
        size = (inp.shape[0], PADDED_CHANNELS, *inp.shape[2:])
        g = torch.nn.grad.conv2d_input(size, w.contiguous(memory_format=torch.channels_last), gy, c.stride,
                                       c.padding, c.dilation, c.groups)
        fmt = torch.channels_last if inp.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return g[:, :inp.shape[1]].to(inp.dtype).contiguous(memory_format=fmt)
