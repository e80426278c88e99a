"""Where the stream's motion goes wrong (issue 11): do objects move the way their caption says?

Direction is the attribute the stream loses most against its VAE's round trip. For one model of a run (or an
exported model directory) and held-out grammar prompts, the direction of each captioned object's first motion,
fitted over frames 1-12 (the first continued chunk: frame 0 is chunk 0, one latent frame on its own):
  (a) world data and its VAE round trip: the ceiling;
  (b) the model's own stream from the prompt (chunks 0 and 1);
  (c) given the clip's clean first frame as the stream's past, chunk 1 started at each jump of the model's
      budget from the clean chunk noised to that jump's sigma (SDEdit): at which noise level the motion is decided;
  (d) given the clean first frame, one-object prompts with their caption and with the opposite direction, from
      the same noise: does the direction word move the object?
  (e) what the text encoder binds, on two-object captions: held-out accuracy of a linear probe reading the
      colour of a direction word's clause from that word's encoding, and the clause's direction from the colour
      word's (the teacher's cross-attention sees no text positions: only what the encoder mixed into each token).
Each broken down by object count, speed and kind of direction (cardinal or diagonal), with the share of objects
found at all and the share moving within 45 degrees of the wanted direction (imprecise rather than lost). The
teacher samples guided (as `quality.py`'s teacher rows), the student unguided.

    python benchmarks/direction.py --run DIR --model teacher|student --label NAME [--prompts 64] [--teacher-guidance 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from quality import decode, load, stream  # the sibling script's: one loader and one stream for every benchmark
from streamgen.bench import load_average, save_report
from streamgen.config import DEFAULT_STEPS, StreamConfig
from streamgen.engine import SinkWindow, StreamingEngine, TextCondition
from streamgen.pipeline import DEFAULT_MODEL, StreamingPipeline
from streamgen.vae import encode_video
from streamgen_train import stages
from streamgen_train.components import TEACHER_GUIDANCE
from streamgen_train.data import CHUNKS, EVAL_SEED
from streamgen_train.world.grammar import DIRECTIONS, ObjectSpec, direction_name, parse_caption
from streamgen_train.world.scene import VideoWorld
from streamgen_train.world.scorer import analyse

RESULTS = Path(__file__).parent / "results" / "quality_probes"
TEACHER_STEPS = 16  # the teacher's Euler budget: fine enough for its sweep over start levels
FIRST = sum(CHUNKS[:2])  # latent frames of chunks 0 and 1
OPPOSITE = {name: next(n for n, w in DIRECTIONS.items() if w == (-v[0], -v[1])) for name, v in DIRECTIONS.items()}
GROUPS = ("all", "one object", "two objects", "slow", "fast", "cardinal", "diagonal")
FOUND = "found"  # the share of objects the world's analysis finds in their colour: the others count as wrong
NEAR = "within 45°"  # the share moving the wanted direction or a neighbour of it: imprecise rather than lost
BINDING_CAPTIONS = 400  # two-object captions for the text encoder's probe: 800 tokens of each kind


def first_motion(frames: np.ndarray, obj: ObjectSpec) -> str | None:
    """Direction of the object of `obj`'s colour over frames 1-12, or None if it is not found there."""
    found = next((d for d in analyse(frames) if d.colour == obj.colour), None)
    if found is None:
        return None
    track = found.track[1:]
    seen = np.flatnonzero(np.isfinite(track).all(axis=1))
    if len(seen) < 2:
        return None
    velocity = np.polyfit(seen, track[seen], 1)[0]
    return direction_name(*velocity)


def binding(tokenizer, encoder, world: VideoWorld, captions: int = BINDING_CAPTIONS) -> dict[str, float]:
    """(e): held-out accuracy of a linear probe (softmax regression on 3/4 of the tokens) for the clause colour of
    each first direction word and the clause direction of each colour word, over two-object grammar captions."""
    texts, p = [], 0
    while len(texts) < captions:
        caption = world.clip((EVAL_SEED, p), 1)[1]
        p += 1
        if len(parse_caption(caption).objects) == 2:
            texts.append(caption)
    features: dict[str, list] = {"colour from the direction word": [], "direction from the colour word": []}
    labels: dict[str, list] = {k: [] for k in features}
    for caption, hidden in zip(texts, stages.C.encode_captions(tokenizer, encoder, texts)):
        moving = [i for i, word in enumerate(caption.split()) if word == "moving"]  # "a size colour shape moving"
        for obj, m in zip(parse_caption(caption).objects, moving):
            features["colour from the direction word"].append(hidden[m + 1])
            labels["colour from the direction word"].append(obj.colour)
            features["direction from the colour word"].append(hidden[m - 2])
            labels["direction from the colour word"].append(obj.direction)
    result = {}
    for key in features:
        x = torch.stack(features[key])
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        classes = sorted(set(labels[key]))
        y = torch.tensor([classes.index(v) for v in labels[key]])
        train = len(x) * 3 // 4
        probe = torch.nn.Linear(x.shape[1], len(classes))
        optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
        with torch.enable_grad():
            for _ in range(500):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(probe(x[:train]), y[:train]).backward()
                optimizer.step()
        result[key] = float((probe(x[train:]).argmax(1) == y[train:]).float().mean())
        result[f"{key}: chance"] = 1 / len(classes)
    return result


def agreement(videos: list[np.ndarray], captions: list[str], directions: list[list[str]] | None = None) -> dict:
    """Fraction of objects moving the given direction (default: the captioned one), per group; a missing object
    counts as wrong."""
    hits: dict[str, list[float]] = {g: [] for g in (*GROUPS, FOUND, NEAR)}
    for i, (video, caption) in enumerate(zip(videos, captions)):
        objects = parse_caption(caption).objects
        for k, obj in enumerate(objects):
            want = directions[i][k] if directions else obj.direction
            motion = first_motion(video, obj)
            hits[FOUND].append(float(motion is not None))
            hits[NEAR].append(float(motion is not None and np.dot(DIRECTIONS[motion], DIRECTIONS[want]) > 0.7))
            kind = "diagonal" if " " in obj.direction else "cardinal"  # "up left" against "left"
            for group in ("all", "one object" if len(objects) == 1 else "two objects", obj.speed, kind):
                hits[group].append(float(motion == want))
    return {g: (float(np.mean(v)) if v else None, len(v)) for g, v in hits.items()}


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    name = "teacher-euler" if args.model == "teacher" else "anyflow (stage 1)"
    tokenizer, encoder, vae, teacher, models = load(args.run, [name])
    scheduler = stages.C.build_scheduler()
    engine = StreamingEngine(teacher if args.model == "teacher" else models[name], scheduler)
    pipe = StreamingPipeline(teacher, vae, scheduler, encoder, tokenizer)
    steps = TEACHER_STEPS if args.model == "teacher" else DEFAULT_STEPS
    guidance = args.teacher_guidance if args.model == "teacher" else 1.0
    sizes = stages.C.Sizes()
    world = VideoWorld(sizes.height, sizes.width)
    stride = pipe.latent_scale[0]
    clips = [world.clip((EVAL_SEED, p), 1 + stride * (FIRST - 1)) for p in range(args.prompts)]
    captions = [caption for _, caption in clips]
    x0 = torch.cat([encode_video(vae, video).float() for video, _ in clips])
    first, rest = x0.split([CHUNKS[0], CHUNKS[1]], dim=1)

    def condition(texts: list[str]) -> TextCondition:
        embeds = torch.cat([pipe.encode_prompt(c) for c in texts])
        negative = pipe.encode_prompt("").expand_as(embeds) if guidance > 1 else None
        return TextCondition(embeds, negative, guidance)

    def continue_first(text: TextCondition, rows: slice | list[int], noisy: torch.Tensor, start: int) -> list:
        """Chunk 1 after the clean first frame of `rows`, from `noisy` at the `start`-th jump's sigma."""
        cache = engine.new_cache(tuple(x0.shape[-2:]), max(CHUNKS), SinkWindow(1, StreamConfig().window))
        engine.commit(cache, first[rows], text)
        chunk = engine.denoise(cache, noisy, text, steps, start)
        return decode(vae, torch.cat([first[rows], chunk], dim=1))

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(rest.shape, generator=gen)
    text = condition(captions)
    report: dict = {
        "world data": agreement([video for video, _ in clips], captions),
        "VAE round trip": agreement(decode(vae, x0), captions),
    }
    free = stream(engine, text, [torch.randn(first.shape, generator=gen), noise], steps, StreamConfig().window)
    report["the model's stream from the prompt"] = agreement(decode(vae, free), captions)
    sweep = {}
    for start, jump in enumerate(engine.schedule(steps)):
        if start % max(1, steps // 8):
            continue
        sigma = float(jump.sigma_t)
        videos = continue_first(text, slice(None), (1 - sigma) * rest + sigma * noise, start)
        sweep[f"{sigma:.2f}"] = agreement(videos, captions)
        print(f"from sigma {sigma:.2f}: {sweep[f'{sigma:.2f}']['all'][0]:.2f} ({time.perf_counter() - began:.0f} s)")
    report["after the clean first frame, from sigma"] = sweep

    single = [i for i, c in enumerate(captions) if len(parse_caption(c).objects) == 1]
    if not single:
        raise SystemExit("no one-object prompt among these: use more --prompts")
    swapped = []
    for i in single:
        obj = parse_caption(captions[i]).objects[0]
        swapped.append(captions[i].replace(f"moving {obj.direction} ", f"moving {OPPOSITE[obj.direction]} "))
    own = continue_first(condition([captions[i] for i in single]), single, noise[single], 0)
    other = continue_first(condition(swapped), single, noise[single], 0)
    originals = [[parse_caption(captions[i]).objects[0].direction] for i in single]
    report["one object, after the clean first frame"] = {
        "caption": agreement(own, [captions[i] for i in single]),
        "opposite caption": agreement(other, swapped),
        "opposite caption, moving the caption's way": agreement(other, swapped, originals),
    }
    torch.manual_seed(0)  # the probes' initialisation
    report["text encoder binding"] = binding(tokenizer, encoder, world)
    meta = {
        "run": str(args.run),
        "model": args.model,
        "steps": steps,
        "guidance": guidance,
        "prompts": args.prompts,
        "seconds": round(time.perf_counter() - began),
        "load_average": load_average(),
    }
    return {"meta": meta, "results": report}


def render(report: dict) -> str:
    meta, results = report["meta"], report["results"]

    def table(label: str, rows: dict[str, dict]) -> list[str]:
        columns = (*GROUPS, NEAR, FOUND)
        cells = [" | ".join("-" if v[g][0] is None else f"{v[g][0]:.2f}" for g in columns) for v in rows.values()]
        return [f"| {label} | {' | '.join(columns)} |", f"| --- |{' ---: |' * len(columns)}",
                *(f"| {name} | {c} |" for name, c in zip(rows, cells))]

    counts = results["world data"]
    sweep = results["after the clean first frame, from sigma"]
    swap = results["one object, after the clean first frame"]
    bound = results["text encoder binding"]
    frames = {name: results[name] for name in ("world data", "VAE round trip", "the model's stream from the prompt")}
    frames |= {f"after the clean first frame, chunk 1 from sigma {sigma}": v for sigma, v in sweep.items()}
    captions = {
        "the caption's": swap["caption"],
        "the opposite direction's: moving the opposite way": swap["opposite caption"],
        "the opposite direction's: still moving the caption's way": swap["opposite caption, moving the caption's way"],
    }
    return "\n".join([
        f"# Direction of the first motion: {meta['model']} of `{meta['run']}`",
        "",
        f"`python benchmarks/direction.py --run {meta['run']} --model {meta['model']} --prompts {meta['prompts']}`: "
        f"fraction of captioned objects whose motion over frames 1-12 has the captioned direction (8 classes, "
        f"chance 0.125; an object not found in its colour counts as wrong; '{NEAR}': the wanted direction or a "
        f"neighbour; '{FOUND}': the share found), {meta['steps']} steps, guidance {meta['guidance']}. "
        f"Objects: {', '.join(f'{g} {counts[g][1]}' for g in GROUPS)}. Wall time {meta['seconds']} s (load average "
        f"{meta['load_average']}).",
        "",
        *table("frames", frames),
        "",
        "One-object prompts, after the clean first frame, chunk 1 from pure noise (the same noise for both captions):",
        "",
        *table("caption", captions),
        "",
        f"What the text encoder binds ({BINDING_CAPTIONS} two-object captions; a linear probe trained on 3/4 of the "
        "tokens, accuracy on the rest):",
        "",
        "| probe | held-out accuracy | chance |",
        "| --- | ---: | ---: |",
        *(f"| {key} | {bound[key]:.2f} | {bound[f'{key}: chance']:.2f} |" for key in bound if "chance" not in key),
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=DEFAULT_MODEL, help="a run or a model directory")
    parser.add_argument("--model", choices=["teacher", "student"], default="student")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--teacher-guidance", type=float, default=TEACHER_GUIDANCE, help="the teacher's guidance")
    parser.add_argument("--label", default="shipped", help="names the report: direction-LABEL-MODEL")
    parser.add_argument("--out", type=Path, help=f"the report's path without suffix (default: in {RESULTS})")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    save_report(args.out or RESULTS / f"direction-{args.label}-{args.model}", measure(args), render)


if __name__ == "__main__":
    main()
