"""Speed wrappers for a sampling network: channels_last, bf16 autocast, torch.compile, CUDA graphs.

``prepare_model`` returns a callable with the model's contract, ``model(x_t, t) -> Tensor``, that
gives float32 outputs. It knows neither the math nor the network: torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["prepare_model"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _FastModel:
    """The network call with the speed options: channels_last input, bf16 autocast, float32 output.
    Under CUDA graph capture the autocast weight cache must be off (PyTorch's CUDA graph notes)."""

    def __init__(self, model: Model, *, channels_last: bool, bf16: bool, autocast_cache: bool = True) -> None:
        self.model, self.channels_last, self.bf16 = model, channels_last, bf16
        self.autocast_cache = autocast_cache

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16:
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16,
                                cache_enabled=self.autocast_cache):
                out = self.model(x, t)
        else:
            out = self.model(x, t)
        return out.float().contiguous()


_Captured = tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]  # (graph, static x, static t, static out)


class _CUDAGraphModel:
    """Replays a captured CUDA graph of the network call, one graph per input shape."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.graphs: dict[tuple[Any, ...], _Captured] = {}

    def _capture(self, x: torch.Tensor, t: torch.Tensor) -> _Captured:
        sx, st = x.clone(), t.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (cuDNN autotuning, lazy allocations) outside the graph
                self.model(sx, st)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(sx, st)
        return graph, sx, st, out

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t)
        graph, sx, st, out = self.graphs[key]
        sx.copy_(x)
        st.copy_(t)
        graph.replay()
        return out.clone()


def prepare_model(
    model: Model,
    *,
    device: torch.device | str,
    channels_last: bool | None = None,
    compile: bool = False,
    bf16: bool = False,
    cuda_graphs: bool = False,
) -> Model:
    """The model ready for fast sampling on ``device``: an ``nn.Module`` is moved there and put in
    eval mode; ``channels_last`` (default: on CUDA only) lays activations out NHWC; ``compile``
    wraps it in ``torch.compile``; ``bf16`` runs it under bfloat16 autocast; ``cuda_graphs``
    replays a captured CUDA graph per batch shape. With every option off (the default on the CPU)
    the numbers are those of ``model`` itself. The returned callable gives float32 outputs."""
    device = torch.device(device)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
    if channels_last is None:
        channels_last = device.type == "cuda"
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    fast: Model = _FastModel(model, channels_last=channels_last, bf16=bf16, autocast_cache=not cuda_graphs)
    if cuda_graphs:
        fast = _CUDAGraphModel(fast)
    return fast
