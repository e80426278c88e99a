"""Real-image clips: the photographs scikit-image ships, panned and zoomed into video at the model's resolution.

The shapes world alone leaves the VAE unable to represent footage (an uploaded clip came back as blobs in the
world's palette), and no dataset can be downloaded here. A slow camera move over a real photograph is the
simplest real-looking motion: every clip is a pure function of its seed, like the world's. Some images are held
out (`HELD_OUT`) so that the reconstruction of real footage can be measured on pictures no stage trained on.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from .world.scene import Seed

# Colour photographs and textures shipped inside the scikit-image wheel (no download); grayscale ones are
# replicated to RGB, so the VAE also sees luminance-only detail.
TRAIN = (
    "astronaut", "chelsea", "colorwheel", "hubble_deep_field", "immunohistochemistry", "retina", "logo",
    "camera", "brick", "grass", "coins", "moon", "page", "text",
)  # fmt: skip
HELD_OUT = ("coffee", "rocket", "stereo_motorcycle")
_ZOOM = (0.35, 1.0)  # crop side as a fraction of the image's shorter side
_MAX_ZOOM_RATE = 0.4  # relative change of the crop side over a clip
_MAX_PAN = 0.5  # pan over a clip, as a fraction of the crop side


@cache
def image(name: str) -> torch.Tensor:
    """`(3, H, W)` float in [0, 1] of a scikit-image sample image (RGB; alpha dropped, gray replicated)."""
    from skimage import data  # training-only dependency (the `train` extra)

    pixels = getattr(data, name)()
    if name == "stereo_motorcycle":
        pixels = pixels[0]  # (left, right, disparity): the left view
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    x = torch.from_numpy(pixels[..., :3].astype(np.float32))
    return (x / 255.0 if pixels.dtype == np.uint8 else x).permute(2, 0, 1).contiguous()


def clip(seed: Seed, frames: int, height: int = 64, width: int = 64, names: tuple[str, ...] = TRAIN) -> np.ndarray:
    """uint8 `(frames, height, width, 3)`: a camera panning and zooming across one of `names` at constant speed."""
    rng = np.random.default_rng(seed)
    picture = image(names[int(rng.integers(len(names)))])
    if rng.random() < 0.5:
        picture = picture.flip(-1)
    _, h, w = picture.shape
    short = min(h, w)
    side0 = rng.uniform(*_ZOOM)
    side1 = np.clip(side0 * (1 + rng.uniform(-_MAX_ZOOM_RATE, _MAX_ZOOM_RATE)), *_ZOOM)
    # Crop (width, height) in pixels per frame, the output's aspect, never larger than the picture.
    aspect = np.array([width / max(width, height), height / max(width, height)])
    crop = np.linspace(side0, side1, frames)[:, None] * short * aspect[None]
    pan = rng.uniform(-_MAX_PAN, _MAX_PAN, size=2) * crop[0]
    span = np.array([w, h])[None] - crop  # free room for the crop's corner
    corner = np.clip(rng.uniform(0, 1, size=2)[None] * span + np.linspace(0, 1, frames)[:, None] * pan[None], 0, span)
    centre = corner + crop / 2
    # An affine grid per frame in grid_sample's normalised coordinates ([-1, 1] over the whole picture).
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = torch.from_numpy(crop[:, 0] / w).float()
    theta[:, 1, 1] = torch.from_numpy(crop[:, 1] / h).float()
    theta[:, 0, 2] = torch.from_numpy(2 * centre[:, 0] / w - 1).float()
    theta[:, 1, 2] = torch.from_numpy(2 * centre[:, 1] / h - 1).float()
    grid = F.affine_grid(theta, [frames, 3, height, width], align_corners=False)
    # Antialias: shrink the picture near the output scale first, so a wide crop is not a field of aliased samples.
    scale = min(1.0, 2 * max(height, width) / float(crop.max(axis=1).min()))
    small = F.interpolate(picture[None], scale_factor=scale, mode="area") if scale < 1 else picture[None]
    out = F.grid_sample(small.expand(frames, -1, -1, -1), grid, mode="bilinear", align_corners=False)
    return (out.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
