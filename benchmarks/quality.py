"""Few-step quality of the default model's recipe: teacher Euler vs AnyFlow student vs consistency baseline.

For each step budget and model, on grammar prompts from held-out world seeds:
  (a) PSNR of decoded frames against the teacher's 64-step ODE (classifier-free guided at the guidance the causal
      models distil; they stream unguided), chunk by chunk from the same noise and the same (teacher's) clean
      context;
  (b) the analytic semantic score of the model's own free-running stream of one training clip's length;
  (c) drift: (a) and (b) on a stream `--drift`x longer, streamed by the engine with the model's finite window
      (PSNR over its last clip's worth of chunks; semantic score on its last clip's worth of frames).
The world's own frames at the same times give the scorer's ceiling ("data" row).

    python benchmarks/quality.py --run runs/default [--prompts 8] [--drift 10]
    python benchmarks/quality.py --run streamgen/assets/default-model   # an exported model: teacher and stage 1
    # or in two processes side by side, then one table:
    python benchmarks/quality.py --run R --models teacher-euler,"anyflow (stage 1)" --out /tmp/a
    python benchmarks/quality.py --run R --models "anyflow (stage 2)",consistency --out /tmp/b
    python benchmarks/quality.py --merge /tmp/a.json /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from streamgen.bench import load_average, save_report
from streamgen.config import DEFAULT_STEPS, StreamConfig
from streamgen.engine import SinkWindow, StreamingEngine, TextCondition
from streamgen.models import wan_from_far
from streamgen.pipeline import StreamingPipeline
from streamgen_train import stages
from streamgen_train.components import SHIFT, TEACHER_GUIDANCE, causal_teacher
from streamgen_train.data import CHUNKS, EVAL_SEED
from streamgen_train.world.scene import VideoWorld
from streamgen_train.world.scorer import attribute_agreement, semantic_score
from streamgen.vae import StreamingDecoder, encode_video, to_uint8_frames

BUDGETS = (1, 2, 4, 8, 16)
REFERENCE_STEPS = 64
CLIP_LATENT_FRAMES = stages.C.Sizes().clip_latent_frames


def chunk_sizes(latent_frames: int) -> list[int]:
    sizes = [CHUNKS[0]]
    while sum(sizes) < latent_frames:
        sizes.append(CHUNKS[1])
    return sizes


def decode(vae, latents: torch.Tensor) -> list[np.ndarray]:
    """Frames of the last clip's worth of latents, per prompt, decoded as a stream of their own: every row of the
    table is measured on the same span, and a long stream costs no more to score than a clip."""
    with StreamingDecoder(vae) as decoder:
        video = decoder.decode(latents[:, -CLIP_LATENT_FRAMES:]).float()
    return [to_uint8_frames(v[None]) for v in video]


def round_trip(vae, frames: np.ndarray) -> np.ndarray:
    """The VAE's own round trip of a world clip (encode, then `decode`): what a model that made the clip's latents
    would show, and so the ceiling of any model this VAE decodes."""
    return decode(vae, encode_video(vae, frames))[0]


@torch.no_grad()
def stream(engine, text, noises, steps, window, context=None) -> torch.Tensor:
    """Latents of a stream; with `context`, each chunk is denoised after the context's earlier chunks instead of its
    own (the same clean past for every model)."""
    cache = engine.new_cache(
        tuple(noises[0].shape[-2:]), max(CHUNKS), SinkWindow(1, window)
    )
    out = []
    for k, noise in enumerate(noises):
        latents = engine.denoise(cache, noise, text, steps)
        out.append(latents)
        engine.commit(cache, latents if context is None else context[k], text)
    return torch.cat(out, dim=1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


MODELS = ("teacher-euler", "anyflow (stage 2)", "anyflow (stage 1)", "consistency")  # table order


def load(run: Path, names: list[str]) -> tuple:
    """Tokenizer, text encoder, VAE, teacher and the named causal models of a training run, or of an exported model
    directory (the shipped model, whose run need not survive): its transformer is stage 1, and its teacher is that
    transformer read back as a Wan model (`wan_from_far`: the teacher stage 1 started from, as distillation left it)."""
    if (run / "model_index.json").is_file():
        pipe = StreamingPipeline.from_pretrained(run, device="cpu")
        teacher = causal_teacher(wan_from_far(pipe.transformer))
        models = {"teacher-euler": teacher, "anyflow (stage 1)": pipe.transformer}
        return pipe.tokenizer, pipe.text_encoder, pipe.vae, teacher, {n: models[n] for n in names if n in models}
    recipe = stages.Recipe(root=run)
    teacher = causal_teacher(stages.load_teacher(recipe))
    loaders = {
        "teacher-euler": lambda: teacher,
        "anyflow (stage 2)": lambda: stages.load_far(recipe, "distill"),
        "anyflow (stage 1)": lambda: stages.load_far(recipe, "student"),
        "consistency": lambda: stages.load_far(recipe, "consistency"),
    }
    available = [n for n in names if n != "anyflow (stage 2)" or recipe.run("distill").done]
    tokenizer, encoder = stages.load_text(recipe)
    return tokenizer, encoder, stages.load_vae(recipe), teacher, {name: loaders[name]() for name in available}


def measure(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    tokenizer, encoder, vae, teacher, models = load(args.run, args.models)
    sizes = stages.C.Sizes()
    scheduler = stages.C.build_scheduler(args.shift)
    reference_engine = StreamingEngine(teacher, scheduler)
    engines = {name: StreamingEngine(model, scheduler) for name, model in models.items()}
    window = StreamConfig().window
    pipe = StreamingPipeline(teacher, vae, scheduler, encoder, tokenizer)
    world = VideoWorld(sizes.height, sizes.width)
    clip = CLIP_LATENT_FRAMES
    stride, scale = pipe.latent_scale  # the VAE's: frames per latent frame after the first, pixels per latent
    latent_shape = (vae.config.z_dim, sizes.height // scale, sizes.width // scale)
    frames_per_clip = 1 + stride * (CLIP_LATENT_FRAMES - 1)
    lengths = {"clip": chunk_sizes(clip)} | ({"long": chunk_sizes(clip * args.drift)} if args.drift else {})

    rows: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    attributes: dict[tuple[str, int, str], dict[str, float]] = {}
    data_scores: dict[str, list[float]] = {span: [] for span in lengths}
    vae_scores: dict[str, list[float]] = {span: [] for span in lengths}
    data_attributes: dict[str, dict[str, float]] = {}
    vae_attributes: dict[str, dict[str, float]] = {}
    # All prompts stream together as one batch: the engine is batched, and at 8x8 latents one call costs about
    # what one prompt's does.
    seeds = [(EVAL_SEED, p) for p in range(args.prompts)]
    captions = [world.clip(seed, 1)[1] for seed in seeds]
    text = TextCondition(torch.cat([pipe.encode_prompt(c) for c in captions]))
    # The teacher samples guided, as the causal models were trained to follow it; they stream unguided.
    guided = TextCondition(text.embeds, pipe.encode_prompt("").expand_as(text.embeds), args.teacher_guidance)
    gen = torch.Generator().manual_seed(0)
    for span, sizes in lengths.items():
        noises = [torch.randn(len(seeds), f, *latent_shape, generator=gen) for f in sizes]
        total = 1 + stride * (sum(sizes) - 1)
        truths = [world.clip(seed, frames_per_clip, start_frame=total - frames_per_clip)[0] for seed in seeds]
        round_trips = [round_trip(vae, truth) for truth in truths]
        data_scores[span] = [semantic_score(truth, caption) for truth, caption in zip(truths, captions)]
        vae_scores[span] = [semantic_score(video, caption) for video, caption in zip(round_trips, captions)]
        data_attributes[span] = attribute_agreement(truths, captions)
        vae_attributes[span] = attribute_agreement(round_trips, captions)
        reference = stream(reference_engine, guided, noises, REFERENCE_STEPS, window)
        ref_frames = decode(vae, reference)
        for name, engine in engines.items():
            condition = guided if name == "teacher-euler" else text
            for steps in BUDGETS:
                forced = decode(
                    vae, stream(engine, condition, noises, steps, window, context=reference.split(sizes, 1))
                )
                free = decode(vae, stream(engine, condition, noises, steps, window))
                rows[(span, steps, name)] = [
                    (psnr(f, r), semantic_score(g, c))
                    for f, r, g, c in zip(forced, ref_frames, free, captions)
                ]
                attributes[(span, steps, name)] = attribute_agreement(free, captions)
            print(f"{span}: {name} done ({time.perf_counter() - began:.0f} s)", flush=True)

    results = [
        {
            "span": span,
            "steps": steps,
            "model": name,
            "psnr": float(np.mean([r[0] for r in v])),
            "semantic": float(np.mean([r[1] for r in v])),
            "attributes": attributes[(span, steps, name)],
        }
        for (span, steps, name), v in sorted(rows.items())
    ]
    meta = {
        "run": str(args.run),
        "prompts": args.prompts,
        "drift": args.drift,
        "clip_latent_frames": clip,
        "long_latent_frames": sum(lengths["long"]) if args.drift else 0,
        "window": window,
        "reference_steps": REFERENCE_STEPS,
        "teacher_guidance": args.teacher_guidance,
        "shift": args.shift,
        "seconds": round(time.perf_counter() - began),
        "load_average": load_average(),
        "data_semantic": {k: float(np.mean(v)) for k, v in data_scores.items()},
        "vae_semantic": {k: float(np.mean(v)) for k, v in vae_scores.items()},
        "data_attributes": data_attributes,
        "vae_attributes": vae_attributes,
    }
    return {"meta": meta, "results": results}


def render(report: dict) -> str:
    meta, results = report["meta"], report["results"]
    cell = {(r["span"], r["steps"], r["model"]): r for r in results}
    names = [n for n in MODELS if any(r["model"] == n for r in results)]
    data, vae = meta["data_semantic"], meta["vae_semantic"]
    long = (
        f" and {data['long']:.2f} at the end of the long stream" if meta["drift"] else "",
        f" and {vae['long']:.2f}" if meta["drift"] else "",
        f"Long = {meta['long_latent_frames']} latent frames ({meta['drift']}x a training clip), window "
        f"{meta['window']}; scores on its last clip's worth of frames. " if meta["drift"] else "No long stream. ",
    )
    lines = [
        "# Few-step quality (toy default model)",
        "",
        (
            f"`python benchmarks/quality.py --run {meta['run']} --prompts {meta['prompts']} --drift {meta['drift']}"
            + (f' --models "{",".join(names)}"' if set(names) != set(MODELS) else "")
            + (f" --teacher-guidance {meta['teacher_guidance']}" if meta["teacher_guidance"] != TEACHER_GUIDANCE else "")
            + (f" --shift {meta['shift']}" if meta.get("shift", SHIFT) != SHIFT else "")
            + f"`: "
            f"{meta['prompts']} held-out grammar prompts; PSNR (dB) of decoded frames against the teacher's "
            f"{meta['reference_steps']}-step ODE (guided at {meta['teacher_guidance']}, as the teacher rows; the "
            f"causal models stream unguided) from the same noise and teacher context; semantic score in [0, 1] of "
            f"the model's own stream. World data scores {data['clip']:.2f} on a clip{long[0]}; its VAE round trip "
            f"(the ceiling of any model decoded by this VAE) {vae['clip']:.2f}{long[1]}. {long[2]}"
            f"Wall time {meta['seconds']} s (load average {meta['load_average']})."
        ),
        "",
        "| steps | model | PSNR clip | semantic clip | PSNR long | semantic long |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for steps in BUDGETS:
        for name in names:
            c, l = cell[("clip", steps, name)], cell.get(("long", steps, name))
            far = f"{l['psnr']:.1f} | {l['semantic']:.2f}" if l else "- | -"
            lines.append(f"| {steps} | {name} | {c['psnr']:.1f} | {c['semantic']:.2f} | {far} |")
    return "\n".join([*lines, "", *render_attributes(report)]) + "\n"


def render_attributes(report: dict) -> list[str]:
    """Where the semantic score is lost: agreement per kind of attribute at the default step budget."""
    meta = report["meta"]
    kinds = list(meta["data_attributes"]["clip"])
    lines = [
        f"Agreement per kind of attribute (objects pooled; a missing object fails all of its own) of the free stream "
        f"at {DEFAULT_STEPS} steps, on the clip" + (" and the long stream's last clip" if meta["drift"] else "") + ":",
        "",
        f"| span | frames | {' | '.join(kinds)} |",
        f"| --- | --- |{' ---: |' * len(kinds)}",
    ]
    cell = {(r["span"], r["model"]): r["attributes"] for r in report["results"] if r["steps"] == DEFAULT_STEPS}
    for span in meta["data_attributes"]:
        named = {"world data": meta["data_attributes"][span], "VAE round trip": meta["vae_attributes"][span]}
        named |= {name: cell[(span, name)] for name in MODELS if (span, name) in cell}
        lines += [f"| {span} | {name} | {' | '.join(f'{v[k]:.2f}' for k in kinds)} |" for name, v in named.items()]
    return lines


def merge(parts: list[dict]) -> dict:
    """One report from runs over disjoint model sets (same run, prompts and noise: the reference is identical)."""
    meta = dict(parts[0]["meta"])
    meta["seconds"] = max(p["meta"]["seconds"] for p in parts)  # the parts ran side by side
    meta["load_average"] = [p["meta"]["load_average"] for p in parts]
    return {"meta": meta, "results": [r for p in parts for r in p["results"]]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument(
        "--drift", type=int, default=10, help="long stream = this many training clips (0: none)"
    )
    parser.add_argument(
        "--models",
        type=lambda text: text.split(","),
        default=list(MODELS),
        help="comma-separated subset of the models (e.g. to run parts side by side and --merge them)",
    )
    parser.add_argument(
        "--teacher-guidance",
        type=float,
        default=TEACHER_GUIDANCE,
        help="classifier-free guidance of the teacher rows and the reference (default: the one the recipe distils)",
    )
    parser.add_argument(
        "--shift", type=float, default=SHIFT, help="the sampler's time shift, every row's (default: the recipe's)"
    )
    parser.add_argument("--merge", type=Path, nargs="+", help="combine these parts' JSON into one report")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "quality"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.merge:
        report = merge([json.loads(path.read_text()) for path in args.merge])
    else:
        report = measure(args)
    save_report(args.out, report, render)


if __name__ == "__main__":
    main()
