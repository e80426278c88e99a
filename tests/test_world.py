"""The synthetic world: determinism, endless continuation, bounces, caption grammar and the analytic scorer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streamgen_train.world.grammar import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    CaptionSpec,
    parse_caption,
    vocabulary,
)
from streamgen_train.world.scene import VideoWorld, render, sample_scene
from streamgen_train.world.scorer import analyse, attribute_agreement, score_details, semantic_score

SEEDS = range(12)
OPPOSITE = {name: next(o for o, v in DIRECTIONS.items() if v == (-x, -y)) for name, (x, y) in DIRECTIONS.items()}


def degrade(frames: np.ndarray, sigma: float, noise: float, seed: int = 0) -> np.ndarray:
    """Gaussian blur (separable, edge-padded) plus gaussian noise: a stand-in for blurry generated video."""
    radius = int(3 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    x = frames.astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(k * np.take(p, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
    x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def wrong(spec: CaptionSpec, attribute: str) -> CaptionSpec:
    """The caption with one attribute of the first object (or the background) changed to something untrue."""
    if attribute == "background":
        return dataclasses.replace(spec, background=next(b for b in BACKGROUNDS if b != spec.background))
    first = spec.objects[0]
    value = {
        "colour": next(c for c in COLOURS if c not in {o.colour for o in spec.objects}),
        "shape": next(s for s in SHAPES if s != first.shape),
        "size": "large" if first.size == "small" else "small",
        "direction": OPPOSITE[first.direction],
        "speed": "fast" if first.speed == "slow" else "slow",
    }[attribute]
    return dataclasses.replace(spec, objects=(dataclasses.replace(first, **{attribute: value}), *spec.objects[1:]))


def test_same_seed_same_clip_different_seed_different_clip() -> None:
    world = VideoWorld()
    frames, caption = world.clip(7, 24)
    again, caption_again = world.clip(7, 24)
    assert frames.dtype == np.uint8 and frames.shape == (24, 64, 64, 3)
    assert caption == caption_again and np.array_equal(frames, again)
    other, other_caption = world.clip(8, 24)
    assert other_caption != caption or not np.array_equal(other, frames)
    assert sample_scene(np.random.default_rng(7)) == sample_scene(7)


def test_batch_is_made_of_clips() -> None:
    world = VideoWorld()
    frames, captions = world.batch(3, 4, 81)
    assert frames.shape == (4, 81, 64, 64, 3) and frames.dtype == np.uint8 and len(captions) == 4
    for i in range(4):
        clip, caption = world.clip((3, i), 81)
        assert np.array_equal(frames[i], clip) and captions[i] == caption
    assert len(set(captions)) > 1
    assert VideoWorld(128, 128).clip(3, 5)[0].shape == (5, 128, 128, 3)


def test_render_continues_an_endless_clip() -> None:
    for seed in range(4):
        scene = sample_scene(seed)
        whole = render(scene, 40, 64, 64)
        pieces = [render(scene, 20, 64, 64), render(scene, 20, 64, 64, start_frame=20)]
        assert np.array_equal(np.concatenate(pieces), whole)
        # Far into the stream (10x a training clip) pieces still agree.
        far = render(scene, 10, 64, 64, start_frame=810)
        assert np.array_equal(np.concatenate([render(scene, 4, 64, 64, 810), render(scene, 6, 64, 64, 814)]), far)


@pytest.mark.parametrize("size", [64, 128])
def test_bounces_keep_objects_whole_inside_the_frame(size: int) -> None:
    for seed in range(3 if size == 64 else 1):
        scene = sample_scene(seed, num_objects=1)
        obj = scene.objects[0]
        frames = render(scene, 400, size, size).astype(np.float32)
        background = np.asarray(BACKGROUNDS[scene.background], np.float32)
        colour = np.asarray(COLOURS[obj.colour], np.float32)
        # Coverage summed over the frame is the object's area; any clipping at a wall would shrink it.
        coverage = ((frames - background) @ (colour - background) / np.sum((colour - background) ** 2)).sum(axis=(1, 2))
        assert coverage.min() > 0.97 * coverage.max()
        # And it did hit walls: its horizontal or vertical motion reverses at least once.
        weights = np.linalg.norm(frames - background, axis=-1)
        centre_x = (weights * np.arange(size)).sum(axis=(1, 2)) / weights.sum(axis=(1, 2))
        centre_y = (weights * np.arange(size)[:, None]).sum(axis=(1, 2)) / weights.sum(axis=(1, 2))
        steps = np.sign(np.stack([np.diff(centre_x), np.diff(centre_y)]).round(3))
        assert any((row > 0).any() and (row < 0).any() for row in steps)


def test_caption_matches_frames_directly() -> None:
    for seed in SEEDS:
        scene = sample_scene(seed, num_objects=1)
        obj, spec = scene.objects[0], scene.spec.objects[0]
        frames = render(scene, 11, 64, 64)
        near = np.linalg.norm(frames.astype(np.float32) - COLOURS[obj.colour], axis=-1) < 30
        ys, xs = np.mgrid[0:64, 0:64]
        area = near.sum(axis=(1, 2))
        centroids = np.stack([(near * xs).sum(axis=(1, 2)) / area, (near * ys).sum(axis=(1, 2)) / area], axis=1)
        motion = centroids[-1] - centroids[0]
        ux, uy = DIRECTIONS[spec.direction]
        # Along the captioned direction it moved; across it, it did not (no bounce in the first second).
        assert motion @ (ux, uy) > 2.0
        assert abs(motion @ (-uy, ux)) < 1.0
        x, y = np.rint(centroids[0] - 0.5).astype(int)
        assert tuple(frames[0, y, x]) == COLOURS[obj.colour]


@pytest.mark.parametrize("size", [64, 128])
def test_clips_score_high_against_their_own_caption(size: int) -> None:
    world = VideoWorld(size, size)
    for seed in SEEDS if size == 64 else range(3):
        frames, caption = world.clip(seed, 32)
        assert semantic_score(frames, caption) >= 0.9, (caption, score_details(frames, caption))


def test_wrong_caption_scores_clearly_lower() -> None:
    for seed in range(6):
        scene = sample_scene(seed)
        frames = render(scene, 32, 64, 64)
        own = semantic_score(frames, scene.caption)
        for attribute in ("colour", "shape", "direction", "size", "speed", "background"):
            details = score_details(frames, wrong(scene.spec, attribute))
            assert details["background" if attribute == "background" else f"object0.{attribute}"] == 0.0
            # One false attribute out of at most 12 costs a full twelfth.
            assert sum(details.values()) / len(details) <= own - 1 / 12 + 1e-9, (scene.caption, attribute)


def test_attribute_agreement_names_the_attribute_that_is_wrong() -> None:
    scenes = [sample_scene(seed) for seed in range(4)]
    videos = [render(scene, 32, 64, 64) for scene in scenes]
    right = attribute_agreement(videos, [scene.caption for scene in scenes])
    assert set(right) == {"background", "count", "colour", "shape", "size", "direction", "speed"}
    wrong_colour = attribute_agreement(videos, [wrong(scene.spec, "colour") for scene in scenes])
    # Each scene's first object is miscaptioned: at least that share of colours fails, and nothing else moves.
    objects = sum(len(scene.spec.objects) for scene in scenes)
    assert wrong_colour["colour"] <= right["colour"] - len(scenes) / objects + 1e-9
    assert {k: v for k, v in wrong_colour.items() if k != "colour"} == {k: v for k, v in right.items() if k != "colour"}


def test_score_is_robust_to_blur_and_noise() -> None:
    for seed in SEEDS:
        scene = sample_scene(seed)
        frames = degrade(render(scene, 32, 64, 64), sigma=1.0, noise=8.0, seed=seed)
        own = semantic_score(frames, scene.caption)
        assert own >= 0.9, (scene.caption, score_details(frames, scene.caption))
        assert semantic_score(frames, wrong(scene.spec, "colour")) < own
    scene = sample_scene(1)
    frames = degrade(render(scene, 32, 128, 128), sigma=2.0, noise=8.0)
    assert semantic_score(frames, scene.caption) >= 0.9


def test_noise_and_blank_frames_score_low() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)
    gray = np.full((32, 64, 64, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    assert analyse(noise) == [] and analyse(gray) == []
    for seed in range(6):
        caption = sample_scene(seed).caption
        assert semantic_score(noise, caption) <= 0.2
        assert semantic_score(gray, caption) <= 0.2


def test_single_frame_shows_appearance_not_motion() -> None:
    scene = sample_scene(2, num_objects=1)
    spec = scene.spec.objects[0]
    (found,) = analyse(render(scene, 1, 64, 64)[0])
    assert (found.colour, found.shape, found.size) == (spec.colour, spec.shape, spec.size)
    assert found.direction is None and found.speed is None


def test_parse_caption_round_trips_and_vocabulary_covers_captions() -> None:
    words = set(vocabulary())
    seen_two = False
    for seed in range(60):
        scene = sample_scene(seed)
        assert parse_caption(scene.caption) == scene.spec
        assert scene.spec.caption == scene.caption
        assert set(scene.caption.split()) <= words
        seen_two |= len(scene.objects) == 2
    assert seen_two
    typed = parse_caption("  A Small Red Circle moving UP LEFT slowly  on a dark blue background. ")
    assert typed is not None and typed.caption == "a small red circle moving up left slowly on a dark blue background"


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "a cat playing the piano",
        "a small red circle moving left slowly",
        "a small orange circle moving left slowly on a black background",
        "a red circle moving left slowly on a black background",
        "a small red circle moving left slowly and on a black background",
        "a small red circle moving sideways slowly on a black background",
    ],
)
def test_prompts_outside_the_grammar_parse_to_none(prompt: str) -> None:
    assert parse_caption(prompt) is None
    with pytest.raises(ValueError):
        semantic_score(np.zeros((2, 64, 64, 3), np.uint8), prompt)
