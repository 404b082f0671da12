"""What a transformer or block call passes: its arguments by name, its input's shape, its timestep."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import torch


def _parameter_names(function: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def _argument(names: tuple[str, ...], name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = names.index(name)
    return args[index] if index < len(args) else None


def _shape_signature(sample: Any) -> tuple | None:
    """Shape and device of the model input (a tensor, or Z-Image's list of tensors): a new
    one means a new batch, resolution or device, and a fresh state."""
    if isinstance(sample, torch.Tensor):
        return (tuple(sample.shape), sample.device.type)
    if isinstance(sample, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in sample):
        return tuple((tuple(s.shape), s.device.type) for s in sample)
    return None


#: Up to this many timestep values (a batch's), the largest is taken on the host.
SMALL_TIMESTEPS = 64


def _scalar(timestep: Any) -> float | None:
    """One number for a call's timestep input: per-sample (and Wan's per-token) timesteps
    are equal but for masked conditioning tokens at 0, so the largest is taken."""
    if timestep is None:
        return None
    value = torch.as_tensor(timestep)
    if 0 < value.numel() <= SMALL_TIMESTEPS:  # one per batch item: one copy to the host, no reduction kernel
        values = value.reshape(-1).tolist()
        return math.nan if any(v != v for v in values) else float(max(values))  # NaN wins, as in torch's max
    return float(value.max())


def sample_of(output: Any) -> Any:
    """The model output's prediction: the tensor itself, the first item of a tuple
    (``return_dict=False``), or ``.sample`` (``Transformer2DModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "sample", None)


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """``output`` in its own type with ``sample`` as its prediction (see :func:`sample_of`)."""
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)):
        return type(output)((sample, *output[1:]))
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, sample=sample)
    raise TypeError(f"HyCa cannot put a forecast into a {type(output).__name__} output")
