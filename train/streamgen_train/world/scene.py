"""The synthetic world's scenes: coloured shapes that move and bounce, sampled from a seed and rendered.

Every clip is a deterministic function of a seed, its caption comes from the grammar (`grammar`). Units are
resolution-free so one `Scene` renders at 64 or 128 pixels alike: positions are fractions of the frame
width/height, velocities fractions per second, sizes fractions of the shorter side. Image y grows downwards, so
"up" is -y. Time runs at `DEFAULT_FPS`, and frame t of a clip is a pure function of t, which makes every clip an
endless stream that can be rendered in pieces.
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
    DIRECTIONS,
    SHAPES,
    SIZES,
    SPEEDS,
    CaptionSpec,
    ObjectSpec,
    direction_name,
    nearest_class,
)

MAX_OBJECTS = 2
SIZE_JITTER = 0.10
_SPEED_JITTER = 0.15
# Objects start this far (in seconds of travel) from the wall ahead, so the captioned direction is what the
# first second shows; after that they bounce and the caption describes how the clip began.
LEAD_SECONDS = 1.0

Seed = int | Sequence[int]


@dataclass(frozen=True)
class SceneObject:
    """One shape with its geometry; the symbolic size/direction/speed are derived from it, never stored twice."""

    shape: str
    colour: str
    half_size: float  # fraction of the shorter frame side
    position: tuple[float, float]  # centre at t=0, fractions of (width, height)
    velocity: tuple[float, float]  # fractions of (width, height) per second, before any bounce

    @property
    def spec(self) -> ObjectSpec:
        vx, vy = self.velocity
        return ObjectSpec(
            shape=self.shape,
            colour=self.colour,
            size=nearest_class(self.half_size, SIZES),
            direction=direction_name(vx, vy),
            speed=nearest_class(math.hypot(vx, vy), SPEEDS),
        )


@dataclass
class Scene:
    """The sampled parameters of one endless clip; objects are in draw order (back to front)."""

    objects: list[SceneObject]
    background: str

    @property
    def spec(self) -> CaptionSpec:
        return CaptionSpec(tuple(o.spec for o in self.objects), self.background)

    @property
    def caption(self) -> str:
        return self.spec.caption


def _start_coordinate(rng: np.random.Generator, half: float, v: float) -> float:
    """A start along one axis with `LEAD_SECONDS` seconds of travel before the wall ahead (always feasible:
    the largest half-size plus the fastest travel is well under the free span)."""
    lo, hi = half, 1.0 - half
    if v > 0:
        hi -= v * LEAD_SECONDS
    elif v < 0:
        lo -= v * LEAD_SECONDS
    return float(rng.uniform(lo, hi))


def _overlap_early(a: SceneObject, b: SceneObject) -> bool:
    """Whether two objects' bounding squares meet during the first `LEAD_SECONDS` seconds (no bounce happens then)."""
    gap = a.half_size + b.half_size + 0.02
    for t in np.linspace(0.0, LEAD_SECONDS, 17):
        dx = a.position[0] - b.position[0] + (a.velocity[0] - b.velocity[0]) * t
        dy = a.position[1] - b.position[1] + (a.velocity[1] - b.velocity[1]) * t
        if max(abs(dx), abs(dy)) < gap:
            return True
    return False


def _sample_object(rng: np.random.Generator, colour: str) -> SceneObject:
    """One object; size and speed are jittered around their class so the model sees a spread, classes kept apart."""
    shape = str(rng.choice(SHAPES))
    half = SIZES[str(rng.choice(list(SIZES)))] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    speed = SPEEDS[str(rng.choice(list(SPEEDS)))] * rng.uniform(1 - _SPEED_JITTER, 1 + _SPEED_JITTER)
    ux, uy = DIRECTIONS[str(rng.choice(list(DIRECTIONS)))]
    velocity = (speed * ux, speed * uy)
    position = (_start_coordinate(rng, half, velocity[0]), _start_coordinate(rng, half, velocity[1]))
    return SceneObject(shape, colour, float(half), position, velocity)


def sample_scene(rng: np.random.Generator | Seed, num_objects: int | None = None) -> Scene:
    """Draw a scene: 1..MAX_OBJECTS objects of distinct colours (so each stays identifiable when they overlap).

    Objects are redrawn until they stay apart for the first `LEAD_SECONDS` seconds, so everything the caption states
    is fully visible at the start; overlap later is wanted (occlusion).
    """
    rng = np.random.default_rng(rng)
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    if not 1 <= n <= len(COLOURS):
        raise ValueError(f"num_objects must be in [1, {len(COLOURS)}], got {n}")
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
    for _ in range(100):  # a handful of tries for two objects; many objects may run out and keep an overlap
        objects = [_sample_object(rng, colour) for colour in colours]
        if not any(_overlap_early(a, b) for a, b in itertools.combinations(objects, 2)):
            break
    return Scene(objects, background)


def example_captions(seed: Seed = 0) -> list[str]:
    """Prompts a person can start from, one per background (the last with two objects): recorded in the model's
    directory at export and offered by the web page."""
    rng = np.random.default_rng(seed)
    captions = []
    for i, background in enumerate(BACKGROUNDS):
        scene = sample_scene(rng, num_objects=1 if i < len(BACKGROUNDS) - 1 else 2)
        captions.append(Scene(scene.objects, background).caption)
    return captions


def _fold(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Elastic bounces between two walls in closed form (a triangle wave), so any frame is computed directly."""
    span = hi - lo
    if span <= 0:
        return np.full_like(p, (lo + hi) / 2)
    q = np.mod(p - lo, 2 * span)
    return lo + np.minimum(q, 2 * span - q)


def _shape_coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixel coverage from a signed distance (inside > 0): one pixel of anti-aliasing, cheap and smooth."""
    if shape == "circle":
        inside = r - np.sqrt(dx * dx + dy * dy)
    elif shape == "square":
        inside = r - np.maximum(np.abs(dx), np.abs(dy))
    else:  # triangle: apex (0, -r), base corners (+-r, r), so it fills half its bounding box
        inside = np.minimum(r - dy, (dy + r - 2 * np.abs(dx)) / math.sqrt(5))
    return np.clip(inside + 0.5, 0.0, 1.0)


def coverage(scene: Scene, num_frames: int, height: int = 64, width: int = 64, start_frame: int = 0) -> np.ndarray:
    """Each object's own pixel coverage in [0, 1] over frames [start_frame, start_frame + num_frames), float32
    (objects, T, H, W), before occlusion: where each object is, what its shape is, for labels as well as `render`.

    Positions are closed-form in time, so rendering in pieces gives exactly the frames of one long render.
    """
    if height <= 0 or width <= 0 or num_frames < 0:
        raise ValueError(f"bad render size {num_frames}x{height}x{width}")
    seconds = (start_frame + np.arange(num_frames)) / DEFAULT_FPS
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    out = np.zeros((len(scene.objects), num_frames, height, width), dtype=np.float32)
    for k, obj in enumerate(scene.objects):
        r = obj.half_size * min(height, width)
        cx = _fold(width * (obj.position[0] + obj.velocity[0] * seconds), r, width - r).astype(np.float32)
        cy = _fold(height * (obj.position[1] + obj.velocity[1] * seconds), r, height - r).astype(np.float32)
        out[k] = _shape_coverage(obj.shape, xs[None, None, :] - cx[:, None, None], ys[None, :, None] - cy[:, None, None], r)
    return out


def render(scene: Scene, num_frames: int, height: int = 64, width: int = 64, start_frame: int = 0) -> np.ndarray:
    """Frames [start_frame, start_frame + num_frames) of the scene's endless clip, uint8 (T, H, W, 3): the objects'
    `coverage` blended over the background, back to front."""
    alphas = coverage(scene, num_frames, height, width, start_frame)
    out = np.empty((num_frames, height, width, 3), dtype=np.float32)
    out[...] = BACKGROUNDS[scene.background]
    for obj, alpha in zip(scene.objects, alphas):
        out += alpha[..., None] * (np.asarray(COLOURS[obj.colour], dtype=np.float32) - out)
    return np.rint(out).astype(np.uint8)


class VideoWorld:
    """Captioned clips at one resolution: the training data source of the small default model."""

    def __init__(self, height: int = 64, width: int = 64) -> None:
        self.height = height
        self.width = width

    def scene(self, seed: Seed) -> Scene:
        return sample_scene(seed)

    def clip(self, seed: Seed, num_frames: int, start_frame: int = 0) -> tuple[np.ndarray, str]:
        """One clip and its caption; `start_frame` continues the same endless clip (a stream longer than training)."""
        scene = self.scene(seed)
        return render(scene, num_frames, self.height, self.width, start_frame), scene.caption

    def batch(self, seed: int, batch_size: int, num_frames: int) -> tuple[np.ndarray, list[str]]:
        """(B, T, H, W, 3) uint8 and B captions; element i is `clip((seed, i))`, so batches never share clips."""
        clips = [self.clip((seed, i), num_frames) for i in range(batch_size)]
        if not clips:
            return np.empty((0, num_frames, self.height, self.width, 3), np.uint8), []
        return np.stack([c[0] for c in clips]), [c[1] for c in clips]
