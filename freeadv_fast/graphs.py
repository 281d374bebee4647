"""Whole training steps as CUDA graphs.

A step of a small model is bound by kernel launches and Python, not by the
GPU: PreActResNet-18 on CIFAR takes ~7.5 ms a step in eager mode while its
arithmetic needs under 2. Capturing the step once and replaying it removes
both. A capturable step ("body") works on static tensors only: no host
logic, no host syncs, no new shapes; everything that is host logic (data,
step counts, the LR schedule, logging, checkpoints) stays outside it.

The first ``warmup`` calls run the body eagerly on a side stream, as CUDA
graphs need (cuDNN and Triton autotuning, lazy allocations, optimizer state);
they are real training steps, so graphed training is step for step the
eager arithmetic. The next call captures the body, then replays it.
"""
from __future__ import annotations

import torch


class StepGraph:
    """``body`` run eagerly ``warmup`` times, then captured once and replayed."""

    def __init__(self, body, *, warmup: int = 3, generators=()):
        self.body, self.warmup, self.generators = body, warmup, tuple(generators)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_calls = 0
        self._side = torch.cuda.Stream()

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return
        if self.eager_calls < self.warmup:
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                self.body()
            torch.cuda.current_stream().wait_stream(self._side)
            self.eager_calls += 1
            return
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:  # their draws advance per replay, as eager ones do
            graph.register_generator_state(generator)
        # thread_local: loader threads may allocate pinned memory while we capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.body()
        self.graph = graph
        graph.replay()  # capturing ran nothing


class Static:
    """The static tensors a captured step reads and writes, by name."""

    def __init__(self, **tensors):
        self.__dict__.update(tensors)
