"""The analytic semantic scorer: how well any video, generated ones included, agrees with a caption.

No learned model: objects are found by colour against the estimated background, then measured (size, shape from
two ratios, direction over the first frames, speed) and matched with the caption's attributes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamgen.config import DEFAULT_FPS

from .grammar import (
    BACKGROUNDS,
    COLOURS,
    SIZES,
    SPEEDS,
    CaptionSpec,
    ObjectSpec,
    direction_name,
    nearest_class,
    parse_caption,
)
from .scene import SIZE_JITTER


@dataclass(eq=False)
class Detection:
    """One object found by `analyse`, with the measurements behind each symbolic attribute.

    `direction`/`speed` are None when motion cannot be measured (a single frame, or an object that barely moves).
    """

    colour: str
    shape: str
    size: str
    direction: str | None
    speed: str | None
    half_size: float  # fraction of the shorter side
    shoulder: float  # narrower quarter-height row / box width: triangle 0.25, circle 0.87, square 1
    diagonal: float  # extent along the diagonals / along the axes: square 1.41, triangle 1.06, circle 1
    velocity: tuple[float, float] | None  # over the first frames, fractions of (width, height) per second
    speed_value: float | None  # median over the clip, fractions of the frame per second
    presence: float  # fraction of frames the object was found in
    track: np.ndarray  # (T, 2) centroid (x, y) in pixels, NaN where absent



_BG_TOLERANCE = 40.0  # RGB distance: border pixels this close to their median count as background
_COLOUR_TOLERANCE = 60.0  # RGB distance a pixel may lie off the background->colour segment
_MIN_ALPHA = 0.5  # at least half-way from background to colour: keeps blurred edges where the true edge was
_MIN_PRESENCE = 0.25  # an object must be found in this fraction of frames; fringes and speckle are transient
_EARLY_FRAMES = 10  # frames for the initial direction, all before the first bounce (see `LEAD_SECONDS`)
_SPEED_WINDOW = 4  # frame gap for speed: long enough that pixel-quantized centroids still resolve slow motion
_REGROW_STEPS = 3  # pixels an eroded mask may grow back (a small triangle's apex is about this long)
# Shape thresholds, set from renders blurred up to sigma 1.5 px at 64 px: blur lifts a triangle's shoulder
# towards 0.55 (a circle's stays >= 0.73) and pulls a square's diagonal towards 1.17 (a circle's stays <= 1.06).
_TRIANGLE_SHOULDER = 0.65
_SQUARE_DIAGONAL = 1.12
_STILL = 0.03  # fraction of the frame per second below which an object is not moving


def _rgb(background: str | Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(BACKGROUNDS[background] if isinstance(background, str) else background, dtype=np.float32)


def estimate_background(frames: np.ndarray) -> np.ndarray | None:
    """The background RGB from the frame borders (objects touch a border only briefly), or None when the
    borders have no dominant colour (noise, textures): then there is no plain background to separate objects from.
    """
    x = np.asarray(frames, dtype=np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]]).reshape(-1, 3)
    if len(border) == 0:
        return None
    near = np.linalg.norm(border - np.median(border, axis=0), axis=1) < _BG_TOLERANCE
    if near.mean() < 0.5:
        return None
    return border[near].mean(axis=0)


def background_name(rgb: np.ndarray | None) -> str | None:
    """The named background an RGB estimate is, or None when it is none of them."""
    if rgb is None:
        return None
    name = min(BACKGROUNDS, key=lambda n: float(np.linalg.norm(rgb - _rgb(n))))
    return name if np.linalg.norm(rgb - _rgb(name)) < _BG_TOLERANCE else None


def _label_pixels(x: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per pixel, the index of the named colour it is a blend of with the background (-1: background/none).

    A blurred edge pixel is `bg + a * (colour - bg)`, so matching against that segment, not the colour itself,
    keeps soft edges from being read as a darker, different colour.
    """
    colours = np.asarray(list(COLOURS.values()), dtype=np.float32) - bg  # (K, 3)
    norms2 = (colours * colours).sum(axis=1)
    d = x.reshape(-1, 3) - bg
    proj = d @ colours.T  # (N, K)
    alpha = proj / norms2
    residual2 = (d * d).sum(axis=1, keepdims=True) - proj * alpha
    residual2[(alpha < _MIN_ALPHA) | (residual2 > _COLOUR_TOLERANCE**2)] = np.inf
    best = residual2.argmin(axis=1)
    labels = np.where(np.isfinite(residual2[np.arange(len(best)), best]), best, -1)
    return labels.reshape(x.shape[:-1]).astype(np.int8)


def _shift3(m: np.ndarray, op: np.ufunc) -> np.ndarray:
    """3x3 erosion (op=logical_and) or dilation (op=logical_or) of (T, H, W) masks, edges replicated."""
    p = np.pad(m, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = op(op(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return op(op(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _shape_features(mask: np.ndarray, box_w: np.ndarray, box_h: np.ndarray) -> tuple[float, float]:
    """Median (shoulder, diagonal) over frames of (N, H, W) masks; see `Detection`.

    Not the bounding-box fill ratio: blur rounds corners and fills a small triangle's apex, which moves fill
    across the class boundaries, while a row at quarter height and the diagonal extents move far less.
    """
    _, h, w = mask.shape
    top = mask.any(axis=2).argmax(axis=1)
    widths = mask.sum(axis=2)
    quarter = [np.take_along_axis(widths, (top + np.floor(f * box_h)).astype(int)[:, None], axis=1)[:, 0]
               for f in (0.25, 0.75)]
    shoulder = np.minimum(*quarter) / box_w
    ys, xs = np.mgrid[0:h, 0:w]

    def spread(coord: np.ndarray) -> np.ndarray:
        return np.where(mask, coord, -np.inf).max(axis=(1, 2)) - np.where(mask, coord, np.inf).min(axis=(1, 2))

    diagonal = (spread(xs + ys) + spread(xs - ys)) / math.sqrt(2) / np.maximum(spread(xs) + spread(ys), 1)
    return float(np.median(shoulder)), float(np.median(diagonal))


def _measure(mask: np.ndarray, colour: str, min_area: float) -> Detection | None:
    """Turn one colour's (T, H, W) mask into a detection, or None if it is not a persistent object."""
    t, h, w = mask.shape
    area = mask.sum(axis=(1, 2))
    present = area >= min_area
    if not present.any() or present.mean() < _MIN_PRESENCE:
        return None
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    box_h = h - rows.argmax(axis=1) - rows[:, ::-1].argmax(axis=1)
    box_w = w - cols.argmax(axis=1) - cols[:, ::-1].argmax(axis=1)
    safe = np.maximum(area, 1)
    track = np.stack([(mask.sum(axis=1) * (np.arange(w) + 0.5)).sum(axis=1) / safe,
                      (mask.sum(axis=2) * (np.arange(h) + 0.5)).sum(axis=1) / safe], axis=1)
    track[~present] = np.nan
    # Shape and size from the less occluded half of the frames (occlusion only ever removes pixels).
    clean = present & (area >= np.median(area[present]))
    half_size = float(np.median(np.maximum(box_w[clean], box_h[clean]))) / 2 / min(h, w)
    shoulder, diagonal = _shape_features(mask[clean], box_w[clean], box_h[clean])
    norm = np.array([w, h], dtype=np.float64)

    velocity = None
    early = np.flatnonzero(present[: _EARLY_FRAMES + 1])
    if len(early) >= 2:
        slope = np.polyfit(early / DEFAULT_FPS, track[early] / norm, 1)[0]
        velocity = (float(slope[0]), float(slope[1]))
    speed_value = None
    gap = min(_SPEED_WINDOW, t - 1)
    if gap >= 1:
        step = np.linalg.norm((track[gap:] - track[:-gap]) / norm, axis=1) * DEFAULT_FPS / gap
        if np.isfinite(step).any():
            speed_value = float(np.nanmedian(step))
    moving = velocity is not None and speed_value is not None and math.hypot(*velocity) > _STILL
    return Detection(
        colour=colour,
        shape="triangle" if shoulder < _TRIANGLE_SHOULDER else "square" if diagonal > _SQUARE_DIAGONAL else "circle",
        size=nearest_class(half_size, SIZES),
        direction=direction_name(*velocity) if moving else None,
        speed=nearest_class(speed_value, SPEEDS) if moving else None,
        half_size=half_size,
        shoulder=shoulder,
        diagonal=diagonal,
        velocity=velocity,
        speed_value=speed_value,
        presence=float(present.mean()),
        track=track,
    )


def analyse(frames: np.ndarray, background: str | Sequence[float] | np.ndarray | None = None) -> list[Detection]:
    """Find the objects of a clip (T, H, W, 3), or of one frame (H, W, 3), without any learned model.

    Pixels are labelled by the named colour they blend towards from the background, each colour's mask is
    eroded (3x3) to drop speckle and regrown within itself, and persistent blobs become detections, largest first.
    Objects are told apart by colour, which the world guarantees is distinct per object. `background` (a name or
    RGB) defaults to the estimate from the borders; with no plain background there is nothing to detect.
    """
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    bg = estimate_background(x) if background is None else _rgb(background)
    if bg is None or len(x) == 0:
        return []
    # Chunked over frames to bound the (pixels x colours) temporaries at larger resolutions.
    labels = np.concatenate([_label_pixels(x[i : i + 16], bg) for i in range(0, len(x), 16)])
    h, w = x.shape[1:3]
    # A fifth of the smallest object (a small triangle): smaller blobs are noise or edge fringes.
    min_area = 0.2 * 2 * (SIZES["small"] * (1 - SIZE_JITTER) * min(h, w)) ** 2
    detections = []
    for k, colour in enumerate(COLOURS):
        mask = labels == k
        if mask.any():
            # Erode away speckle and fringes, then grow back inside the mask: keeps thin parts of real
            # objects (a triangle's apex) that a plain opening would cut off and bias the shape.
            kept = _shift3(mask, np.logical_and)
            for _ in range(_REGROW_STEPS):
                kept = _shift3(kept, np.logical_or) & mask
            found = _measure(kept, colour, min_area)
            if found is not None:
                detections.append(found)
    return sorted(detections, key=lambda d: -d.half_size)


_ATTRIBUTES = ("colour", "shape", "size", "direction", "speed")


def score_details(frames: np.ndarray, caption: str | CaptionSpec) -> dict[str, float]:
    """Per-attribute agreement (1.0 or 0.0) between frames and a grammar caption.

    Keys: "background", "count" (as many objects as captioned) and "object{i}.{attribute}" for each captioned
    object, matched to the detections so as to maximize agreement. Direction is the initial one (clips start
    at least `LEAD_SECONDS` away from a bounce); a single frame cannot show motion, so direction and speed score 0.
    """
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    if spec is None:
        raise ValueError(f"caption is outside the grammar: {caption!r}")
    x = np.asarray(frames)
    bg = estimate_background(x if x.ndim == 4 else x[None])
    detections = analyse(x, bg) if bg is not None else []
    details = {
        "background": float(background_name(bg) == spec.background),
        "count": float(len(detections) == len(spec.objects)),
    }

    def agreement(obj: ObjectSpec, det: Detection | None) -> list[float]:
        return [float(det is not None and getattr(det, a) == getattr(obj, a)) for a in _ATTRIBUTES]

    candidates: list[Detection | None] = [*detections, *([None] * len(spec.objects))]
    best = max(
        itertools.permutations(candidates, len(spec.objects)),
        key=lambda dets: sum(sum(agreement(o, d)) for o, d in zip(spec.objects, dets)),
    )
    for i, (obj, det) in enumerate(zip(spec.objects, best)):
        details.update({f"object{i}.{a}": v for a, v in zip(_ATTRIBUTES, agreement(obj, det))})
    return details


def semantic_score(frames: np.ndarray, caption: str | CaptionSpec) -> float:
    """Fraction of the caption's attributes the frames agree with, in [0, 1] (see `score_details`)."""
    details = score_details(frames, caption)
    return sum(details.values()) / len(details)


def attribute_agreement(videos: Sequence[np.ndarray], captions: Sequence[str | CaptionSpec]) -> dict[str, float]:
    """Mean agreement per kind of attribute over clips, objects pooled (`score_details` keys without their object
    index): where a model's semantic score is lost, e.g. objects missing ("count") rather than miscoloured."""
    agreement: dict[str, list[float]] = {}
    for video, caption in zip(videos, captions, strict=True):
        for key, value in score_details(video, caption).items():
            agreement.setdefault(key.rsplit(".", 1)[-1], []).append(value)
    return {kind: float(np.mean(values)) for kind, values in agreement.items()}
