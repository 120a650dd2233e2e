"""Device selection and the inference context (autocast, channels-last on GPU)."""

from __future__ import annotations

import contextlib

import torch

from .errors import NetVLADError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when there is one, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise NetVLADError(f"device {name!r} is not a valid torch device (use auto, cpu or cuda[:N])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NetVLADError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


def autocast(device: torch.device, dtype: str = "bf16"):
    """Mixed precision on GPU (``bf16``/``fp16``); a no-op on CPU or with ``dtype='fp32'``."""
    if device.type != "cuda" or dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to ``device``; channels-last memory format on GPU."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return images.to(device)
