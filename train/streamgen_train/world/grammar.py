"""The caption grammar of the synthetic world: its words, and captions read back into their attributes.

Captions list objects back to front (draw order, so the last one occludes the others):

    caption   := object ("and" object)* "on a" background "background"
    object    := "a" size colour shape "moving" direction speed
    size      := "small" | "large"
    colour    := "red" | "green" | "blue" | "yellow" | "white" | "magenta"
    shape     := "circle" | "square" | "triangle"
    direction := "left" | "right" | "up" | "down" | "up left" | "up right" | "down left" | "down right"
    speed     := "slowly" | "quickly"
    background:= "black" | "gray" | "dark blue" | "dark green"

`vocabulary()` lists its words for a word-level tokenizer; `parse_caption` reads a caption back. Sizes and speeds
are fractions of the frame (see `scene`), classified on a log scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

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


def nearest_class(value: float, table: dict[str, float]) -> str:
    """Nearest class on a log scale: sizes and speeds are ratios, so their class boundary is geometric."""
    return min(table, key=lambda name: abs(math.log(max(value, 1e-9) / table[name])))


def direction_name(vx: float, vy: float) -> str:
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


def word_objects(caption: str) -> list[ObjectSpec | None]:
    """For each word of a grammar caption, the object whose clause it sits in (None for "and" and the background
    clause); [] for anything outside the grammar. A word-level tokenizer makes this one entry per token."""
    spec = parse_caption(caption)
    if spec is None:
        return []
    words: list[ObjectSpec | None] = []
    for obj in spec.objects:
        words += [None] * bool(words) + [obj] * len(obj.phrase.split())  # "and" before every clause but the first
    return words + [None] * len(f"on a {spec.background} background".split())


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
