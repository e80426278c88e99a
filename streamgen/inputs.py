"""What callers pass to a session, checked up front with messages that name the argument.

Media to extend may be what diffusers' pipelines take: a PIL image, a numpy array or torch tensor with or without
a frame axis, a list of frames; or a file: a path, its bytes, a binary file object (read by `streamgen.media`).
Only the frames used are read: the last ones of a clip, the first of an image.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from . import media

# Frames of a clip kept as the past a stream continues (the last ones): 2 s at 16 fps, 1 + 4k as the VAE encodes.
DEFAULT_CONTEXT_FRAMES = 33
FILE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview)
ACCEPTED = "a path, bytes, a binary file object, a PIL image, a numpy array, a torch tensor or a list of frames"
_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    """An integer argument (numpy integers too; not bools, floats or strings) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r:.40}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value}")
    return value


def real(value: Any, name: str, low: float) -> float:
    """A finite number of at least `low` (ints and floats; not bools or strings)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number of at least {low:g}, got {value}")
    return value


def text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be valid Unicode text (it holds a lone surrogate)") from None
    return value


def tensor(value: Any, name: str, shape: tuple[int, ...] | None = None, dims: int | None = None) -> torch.Tensor:
    """A finite floating-point tensor (numpy arrays are converted) of `shape`, or of `dims` dimensions."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must hold floating-point numbers, got {value.dtype}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if dims is not None and value.ndim != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return value


def read(
    value: Any,
    name: str,
    *,
    height: int,
    width: int,
    fps: int,
    max_frames: int,
    first: bool,
    progress: media.Progress | None = None,
) -> media.Clip:
    """Media to extend, as a clip fitted to `(height, width)`: the first frame (`first`) or the last `max_frames`.

    Frames given in memory are taken to be at the stream's `fps`; files are resampled to it by timestamp. A
    `media.Clip` (read already, e.g. by a server from an upload) keeps its timing."""
    if isinstance(value, media.Clip):
        if value.frames.shape[1:3] != (height, width) or value.fps != fps:
            read_for = f"{value.frames.shape[1:3]} at {value.fps:g} fps"
            raise ValueError(f"{name}: a clip read for {read_for}, not for this stream")
        return dataclasses.replace(value, frames=value.frames[:1] if first else value.frames[-max_frames:])
    if isinstance(value, FILE_TYPES) or hasattr(value, "read"):
        return media.read_clip(
            value, height=height, width=width, fps=fps, max_frames=max_frames, first=first, progress=progress
        )
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} is an empty list: give at least one frame")
        if any(isinstance(item, (list, tuple)) for item in value):
            raise TypeError(f"{name}: a list holds frames (images, arrays, tensors), not lists")
        count, start = len(value), 0 if first else max(0, len(value) - max_frames)
        frames = [_frame(value[i], f"{name}[{i}]") for i in range(start, start + 1 if first else count)]
    elif isinstance(value, Image.Image):
        count, frames = 1, [_frame(value, name)]
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        array = _channels_last(value, name)
        count = len(array) if array.ndim == 4 else 1
        if array.ndim == 4:
            array = array[:1] if first else array[-max_frames:]
        frames = [_frame(frame, name) for frame in (array if array.ndim == 4 else [array])]
    else:
        raise TypeError(f"{name} must be {ACCEPTED}; got {type(value).__name__}")
    fitted = np.stack([media.fit_frames(frame[None], height=height, width=width)[0] for frame in frames])
    return media.Clip(fitted, float(fps), count / fps)


def _channels_last(value: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """An array or tensor as numpy with channels last. Tensors in diffusers' layout, channels first (`(C, H, W)`,
    `(T, C, H, W)`), are moved; channels-last ones (`(H, W, C)`, what `np.asarray(image)` gives) are kept."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    if value.ndim in (3, 4) and value.shape[-3] in _CHANNELS and value.shape[-1] not in _CHANNELS:
        value = np.moveaxis(value, -3, -1)
    return value


def _frame(value: Any, name: str) -> np.ndarray:
    """One frame as uint8 `(H, W, 3)`, from a PIL image or an array/tensor `(H, W)`, `(H, W, C)` or `(C, H, W)`
    with C = 1, 3 or 4: uint8, or floats in [0, 1]. Alpha is dropped."""
    if isinstance(value, Image.Image):
        value = np.asarray(ImageOps.exif_transpose(value).convert("RGB"))
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        value = _channels_last(value, name)
    else:
        raise TypeError(f"{name} must be a PIL image, numpy array or torch tensor frame; got {type(value).__name__}")
    if value.ndim == 2:
        value = value[..., None]
    if value.ndim != 3 or value.shape[2] not in _CHANNELS:
        raise ValueError(
            f"{name} must be frames shaped (H, W), (H, W, C), (T, H, W, C) or, as tensors, (C, H, W), (T, C, H, W) "
            f"with C = 1, 3 or 4; got shape {value.shape}"
        )
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"{name} has no pixels ({value.shape[1]}x{value.shape[0]})")
    if value.dtype == np.uint8:
        pass
    elif np.issubdtype(value.dtype, np.floating):
        if not np.isfinite(value).all() or value.min() < 0 or value.max() > 1:
            raise ValueError(f"{name}: floating-point frames must hold values in [0, 1] (no NaN)")
        value = np.round(value.astype(np.float32) * 255).astype(np.uint8)
    else:
        raise TypeError(f"{name} must hold uint8 values or floats in [0, 1], got {value.dtype}")
    return np.repeat(value, 3, axis=2) if value.shape[2] == 1 else np.ascontiguousarray(value[..., :3])
