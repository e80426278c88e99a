"""A synthetic, captioned video world: coloured shapes that move and bounce, generated on the fly from a seed.

No dataset can be downloaded, yet the small default model needs captioned video whose meaning can be checked
without a learned model. So every clip here is a deterministic function of a seed, its caption comes from a small
grammar (`vocabulary()` lists its words for a word-level tokenizer, `parse_caption` reads it back), and
`semantic_score` measures analytically how well any video, generated ones included, agrees with a caption.

Units are resolution-free so one `Scene` renders at 64 or 128 pixels alike: positions are fractions of the frame
width/height, velocities fractions per second, sizes fractions of the shorter side. Image y grows downwards, so
"up" is -y. Time runs at `DEFAULT_FPS`, and frame t of a clip is a pure function of t, which makes every clip an
endless stream that can be rendered in pieces.

Caption grammar (objects are listed back to front, i.e. in draw order, so the last one occludes the others):

    caption   := object ("and" object)* "on a" background "background"
    object    := "a" size colour shape "moving" direction speed
    size      := "small" | "large"
    colour    := "red" | "green" | "blue" | "yellow" | "white" | "magenta"
    shape     := "circle" | "square" | "triangle"
    direction := "left" | "right" | "up" | "down" | "up left" | "up right" | "down left" | "down right"
    speed     := "slowly" | "quickly"
    background:= "black" | "gray" | "dark blue" | "dark green"
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamgen.config import DEFAULT_FPS

SHAPES = ("circle", "square", "triangle")
# Saturated foreground colours, far from each other and from every (dark or mid-gray) background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 250),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "magenta": (220, 60, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "gray": (110, 110, 110),
    "dark blue": (20, 30, 90),
    "dark green": (20, 70, 35),
}
# Half-size as a fraction of the shorter frame side; speed as a fraction of the frame per second.
SIZES: dict[str, float] = {"small": 0.09, "large": 0.17}
SPEEDS: dict[str, float] = {"slow": 0.15, "fast": 0.40}
_SPEED_WORDS = {"slow": "slowly", "fast": "quickly"}
_SQRT_HALF = math.sqrt(0.5)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up left": (-_SQRT_HALF, -_SQRT_HALF),
    "up right": (_SQRT_HALF, -_SQRT_HALF),
    "down left": (-_SQRT_HALF, _SQRT_HALF),
    "down right": (_SQRT_HALF, _SQRT_HALF),
}
MAX_OBJECTS = 2
_SIZE_JITTER = 0.10
_SPEED_JITTER = 0.15
# Objects start this far (in seconds of travel) from the wall ahead, so the captioned direction is what the
# first second shows; after that they bounce and the caption describes how the clip began.
_LEAD_S = 1.0

Seed = int | Sequence[int]


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object: all symbolic, no geometry."""

    shape: str
    colour: str
    size: str
    direction: str
    speed: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction} {_SPEED_WORDS[self.speed]}"


@dataclass(frozen=True)
class CaptionSpec:
    """A parsed caption: the expectations a video must meet. `caption` is the one place captions are spelled."""

    objects: tuple[ObjectSpec, ...]
    background: str

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects) + f" on a {self.background} background"


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
            size=_nearest_log(self.half_size, SIZES),
            direction=_direction_name(vx, vy),
            speed=_nearest_log(math.hypot(vx, vy), SPEEDS),
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


def _nearest_log(value: float, table: dict[str, float]) -> str:
    """Nearest class on a log scale: sizes and speeds are ratios, so their class boundary is geometric."""
    return min(table, key=lambda name: abs(math.log(max(value, 1e-9) / table[name])))


def _direction_name(vx: float, vy: float) -> str:
    return max(DIRECTIONS, key=lambda name: DIRECTIONS[name][0] * vx + DIRECTIONS[name][1] * vy)


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce, sorted: the basis of a closed word-level tokenizer."""
    words = {"a", "and", "on", "background", "moving", *SHAPES, *COLOURS, *SIZES, *_SPEED_WORDS.values()}
    for name in (*DIRECTIONS, *BACKGROUNDS):
        words.update(name.split())
    return sorted(words)


def _alternation(names: Sequence[str]) -> str:
    # Longest first, so "up left" is tried before "up".
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_OBJECT_RE = re.compile(
    rf"a ({_alternation(list(SIZES))}) ({_alternation(list(COLOURS))}) ({_alternation(SHAPES)}) "
    rf"moving ({_alternation(list(DIRECTIONS))}) ({_alternation(list(_SPEED_WORDS.values()))})"
)
_CAPTION_RE = re.compile(rf"(.+) on a ({_alternation(list(BACKGROUNDS))}) background")
_SPEED_BY_WORD = {word: name for name, word in _SPEED_WORDS.items()}


def parse_caption(text: str) -> CaptionSpec | None:
    """Read a caption of the grammar back into its attributes; None for anything outside the grammar.

    Case, surrounding spaces and a final full stop are forgiven, since users type prompts by hand.
    """
    normalized = " ".join(text.lower().strip().rstrip(".").split())
    match = _CAPTION_RE.fullmatch(normalized)
    if match is None:
        return None
    objects = []
    for phrase in match.group(1).split(" and "):
        obj = _OBJECT_RE.fullmatch(phrase)
        if obj is None:
            return None
        size, colour, shape, direction, word = obj.groups()
        objects.append(ObjectSpec(shape, colour, size, direction, _SPEED_BY_WORD[word]))
    return CaptionSpec(tuple(objects), match.group(2))


def _start_coordinate(rng: np.random.Generator, half: float, v: float) -> float:
    """A start along one axis with `_LEAD_S` seconds of travel before the wall ahead (always feasible:
    the largest half-size plus the fastest travel is well under the free span)."""
    lo, hi = half, 1.0 - half
    if v > 0:
        hi -= v * _LEAD_S
    elif v < 0:
        lo -= v * _LEAD_S
    return float(rng.uniform(lo, hi))


def _overlap_early(a: SceneObject, b: SceneObject) -> bool:
    """Whether two objects' bounding squares meet during the first `_LEAD_S` seconds (no bounce happens then)."""
    gap = a.half_size + b.half_size + 0.02
    for t in np.linspace(0.0, _LEAD_S, 17):
        dx = a.position[0] - b.position[0] + (a.velocity[0] - b.velocity[0]) * t
        dy = a.position[1] - b.position[1] + (a.velocity[1] - b.velocity[1]) * t
        if max(abs(dx), abs(dy)) < gap:
            return True
    return False


def _sample_object(rng: np.random.Generator, colour: str) -> SceneObject:
    """One object; size and speed are jittered around their class so the model sees a spread, classes kept apart."""
    shape = str(rng.choice(SHAPES))
    half = SIZES[str(rng.choice(list(SIZES)))] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    speed = SPEEDS[str(rng.choice(list(SPEEDS)))] * rng.uniform(1 - _SPEED_JITTER, 1 + _SPEED_JITTER)
    ux, uy = DIRECTIONS[str(rng.choice(list(DIRECTIONS)))]
    velocity = (speed * ux, speed * uy)
    position = (_start_coordinate(rng, half, velocity[0]), _start_coordinate(rng, half, velocity[1]))
    return SceneObject(shape, colour, float(half), position, velocity)


def sample_scene(rng: np.random.Generator | Seed, num_objects: int | None = None) -> Scene:
    """Draw a scene: 1..MAX_OBJECTS objects of distinct colours (so each stays identifiable when they overlap).

    Objects are redrawn until they stay apart for the first `_LEAD_S` seconds, so everything the caption states
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


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixel coverage from a signed distance (inside > 0): one pixel of anti-aliasing, cheap and smooth."""
    if shape == "circle":
        inside = r - np.sqrt(dx * dx + dy * dy)
    elif shape == "square":
        inside = r - np.maximum(np.abs(dx), np.abs(dy))
    else:  # triangle: apex (0, -r), base corners (+-r, r), so it fills half its bounding box
        inside = np.minimum(r - dy, (dy + r - 2 * np.abs(dx)) / math.sqrt(5))
    return np.clip(inside + 0.5, 0.0, 1.0)


def render(scene: Scene, num_frames: int, height: int = 64, width: int = 64, start_frame: int = 0) -> np.ndarray:
    """Frames [start_frame, start_frame + num_frames) of the scene's endless clip, uint8 (T, H, W, 3).

    Positions are closed-form in time, so rendering in pieces gives exactly the frames of one long render.
    """
    if height <= 0 or width <= 0 or num_frames < 0:
        raise ValueError(f"bad render size {num_frames}x{height}x{width}")
    seconds = (start_frame + np.arange(num_frames)) / DEFAULT_FPS
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    out = np.empty((num_frames, height, width, 3), dtype=np.float32)
    out[...] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        r = obj.half_size * min(height, width)
        cx = _fold(width * (obj.position[0] + obj.velocity[0] * seconds), r, width - r).astype(np.float32)
        cy = _fold(height * (obj.position[1] + obj.velocity[1] * seconds), r, height - r).astype(np.float32)
        alpha = _coverage(obj.shape, xs[None, None, :] - cx[:, None, None], ys[None, :, None] - cy[:, None, None], r)
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


# --- analytic semantic scorer -------------------------------------------------------------------------------------

_BG_TOLERANCE = 40.0  # RGB distance: border pixels this close to their median count as background
_COLOUR_TOLERANCE = 60.0  # RGB distance a pixel may lie off the background->colour segment
_MIN_ALPHA = 0.5  # at least half-way from background to colour: keeps blurred edges where the true edge was
_MIN_PRESENCE = 0.25  # an object must be found in this fraction of frames; fringes and speckle are transient
_EARLY_FRAMES = 10  # frames for the initial direction, all before the first bounce (see `_LEAD_S`)
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
        size=_nearest_log(half_size, SIZES),
        direction=_direction_name(*velocity) if moving else None,
        speed=_nearest_log(speed_value, SPEEDS) if moving else None,
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
    min_area = 0.2 * 2 * (SIZES["small"] * (1 - _SIZE_JITTER) * min(h, w)) ** 2
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
    at least `_LEAD_S` away from a bounce); a single frame cannot show motion, so direction and speed score 0.
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
