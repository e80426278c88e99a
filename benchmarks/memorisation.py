"""Can the teacher draw the clips it has learned? A probe of the whole sampling chain (issue 11).

A teacher that scores low on held-out prompts is either a model that has not fitted the world, or a sound model
behind a chain that loses what it draws: the causal layout it is sampled in, the engine, the VAE decoder, the
scorer. This separates the two. A copy of a run's teacher (with its text encoder) trains on `--prompts` held-out
world clips alone, with the teacher's own loss, and after each checkpoint streams them from noise the way
`quality.py` measures the teacher (Euler through the causal engine, the last clip decoded as a stream):
  - if its score climbs to the VAE round trip's (the ceiling of anything this VAE decodes), the chain is sound and
    what limits the teacher is fitting the whole world;
  - if it stays where it starts, the chain loses it.
Beside them, the untouched teacher's score on as many of its own training clips: a teacher that memorised its
data would score higher there than on held-out prompts; one that has not fitted it scores the same.

    python benchmarks/memorisation.py --run runs/v4 [--prompts 8] [--checkpoints 300,1000,2000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from quality import CLIP_LATENT_FRAMES, chunk_sizes, decode, stream  # the sibling script's: the same measurement
from streamgen.bench import load_average, save_report
from streamgen.config import StreamConfig
from streamgen.engine import StreamingEngine, TextCondition
from streamgen.vae import encode_video
from streamgen_train import stages
from streamgen_train import components as C
from streamgen_train.data import EVAL_SEED, LATENT_FOOTAGE_EVERY, LATENT_SEED, clip
from streamgen_train.loop import generator
from streamgen_train.losses import teacher_loss
from streamgen_train.world.scorer import semantic_score

RESULTS = Path(__file__).parent / "results" / "quality_probes" / "memorisation"
LEARNING_RATE = 3e-4  # the teacher stage's


def world_clips(recipe: stages.Recipe, seed: int, count: int) -> tuple[list[np.ndarray], list[str]]:
    """`count` captioned clips of one training clip's length: held-out ones (EVAL_SEED), or the first of the
    teacher's own latent set (LATENT_SEED, its footage skipped: it has no caption to score)."""
    frames = 1 + 4 * (CLIP_LATENT_FRAMES - 1)
    found = []
    for i in range(count * LATENT_FOOTAGE_EVERY):
        video, caption = clip(recipe.world, seed, i, frames, LATENT_FOOTAGE_EVERY)
        if caption:
            found.append((np.ascontiguousarray(video), caption))
        if len(found) == count:
            break
    return [v for v, _ in found], [c for _, c in found]


def score(videos: list[np.ndarray], captions: list[str]) -> float:
    return float(np.mean([semantic_score(v, c) for v, c in zip(videos, captions)]))


@torch.no_grad()
def sampled_score(teacher, tokenizer, encoder, vae, captions, shape, args) -> float:
    """Mean semantic score of the teacher's streams of `captions`, over `args.samples` noise seeds."""
    engine = StreamingEngine(C.causal_teacher(teacher).eval(), C.build_scheduler())
    text = TextCondition(C.encode_captions(tokenizer, encoder.eval(), captions))
    scores = []
    for seed in range(args.samples):
        gen = torch.Generator().manual_seed(seed)
        noises = [torch.randn(len(captions), f, *shape, generator=gen) for f in chunk_sizes(CLIP_LATENT_FRAMES)]
        latents = stream(engine, text, noises, args.sampling_steps, StreamConfig().window)
        scores.append(score(decode(vae, latents), captions))
    return float(np.mean(scores))


def measure(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    recipe = stages.Recipe(root=args.run)
    tokenizer, encoder = stages.load_text(recipe)
    vae = stages.load_vae(recipe)
    teacher = stages.load_teacher(recipe)
    videos, captions = world_clips(recipe, EVAL_SEED, args.prompts)
    x0 = torch.cat([encode_video(vae, v).float() for v in videos])  # (prompts, F, C, h, w)
    shape = tuple(x0.shape[2:])
    train_videos, train_captions = world_clips(recipe, LATENT_SEED, args.prompts)

    def sample(names: list[str]) -> float:
        return sampled_score(teacher, tokenizer, encoder, vae, names, shape, args)

    results = {
        "world data": score(videos, captions),
        "VAE round trip": score(decode(vae, x0), captions),
        "training clips": sample(train_captions),
        "training clips, VAE round trip": score(
            decode(vae, torch.cat([encode_video(vae, v).float() for v in train_videos])), train_captions
        ),
        "checkpoints": [{"step": 0, "loss": None, "score": sample(captions)}],
    }
    modules = torch.nn.ModuleList([teacher, encoder]).requires_grad_(True)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    step, losses = 0, []
    for checkpoint in args.checkpoints:
        modules.train()
        while step < checkpoint:
            text = C.encode_captions(tokenizer, encoder, captions)
            loss = teacher_loss(teacher, x0, text, generator(step, 1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        results["checkpoints"].append(
            {"step": step, "loss": float(np.mean(losses[-50:])), "score": sample(captions)}
        )
        print(results["checkpoints"][-1], flush=True)
    return {
        "arguments": f"--run {args.run} --prompts {args.prompts} --checkpoints {','.join(map(str, args.checkpoints))} "
        f"--samples {args.samples} --sampling-steps {args.sampling_steps}",
        "run": str(args.run),
        "prompts": args.prompts,
        "samples": args.samples,
        "sampling_steps": args.sampling_steps,
        "seconds": round(time.perf_counter() - began),
        "load_average": load_average(),
        "results": results,
    }


def render(report: dict) -> str:
    r = report["results"]
    lines = [
        "# Memorisation probe: can the teacher draw clips it has learned?",
        "",
        f"`python benchmarks/memorisation.py {report['arguments']}`: the run's teacher trained on "
        f"{report['prompts']} held-out grammar clips alone; semantic score of its streams of their captions "
        f"({report['sampling_steps']} Euler steps, causal engine; mean over {report['samples']} noise seeds). "
        f"{report['seconds']} s, load average {report['load_average']}.",
        "",
        f"Ceiling on those clips: world data {r['world data']:.2f}, VAE round trip {r['VAE round trip']:.2f}. "
        f"The untouched teacher on {report['prompts']} of its own training clips: {r['training clips']:.2f} "
        f"(their VAE round trip {r['training clips, VAE round trip']:.2f}).",
        "",
        "| training steps on the clips | loss (last 50 steps) | semantic score |",
        "| ---: | ---: | ---: |",
    ]
    for row in r["checkpoints"]:
        loss = "" if row["loss"] is None else f"{row['loss']:.3f}"
        lines.append(f"| {row['step']} | {loss} | {row['score']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/default"), help="a run whose teacher stage finished")
    parser.add_argument("--prompts", type=int, default=8, help="held-out clips to learn (one batch)")
    parser.add_argument(
        "--checkpoints",
        type=lambda text: sorted(int(s) for s in text.split(",")),
        default=[300, 1000, 2000],
        help="training steps at which the teacher is scored",
    )
    parser.add_argument("--samples", type=int, default=2, help="noise seeds per score")
    parser.add_argument("--sampling-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.prompts < 1 or args.samples < 1 or args.checkpoints[0] < 1:
        parser.error("--prompts, --samples and every checkpoint must be at least 1")
    torch.set_num_threads(args.threads)
    save_report(args.out, measure(args), render)


if __name__ == "__main__":
    main()
