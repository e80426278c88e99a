"""`streamgen train <stage> [--steps N] [--out DIR]`: run, or resume, one stage of the recipe or all of them."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from streamgen import options
from streamgen.pipeline import DEFAULT_MODEL, default_device
from . import stages
from .stages import Recipe

# Steps of the CPU recipe (about an hour on two shared cores, see docs/training.md).
DEFAULT_STEPS = {
    "vae": 600,
    "teacher": 1500,
    "decoder": 300,
    "student": 800,
    "distill": 100,
    "consistency": 800,
}
TRAINERS = {
    "vae": stages.train_vae,
    "teacher": stages.train_teacher,
    "decoder": stages.train_decoder,
    "student": stages.train_student,
    "distill": stages.train_distill,
    "consistency": stages.train_consistency,
}
# `all` exports the shipped stage as soon as it exists, then trains stage 2 and the consistency baseline, which
# the quality benchmark compares with it.
ALL = ("vae", "teacher", "decoder", "student", "export", "distill", "consistency")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamgen train", description=__doc__)
    parser.add_argument("stage", choices=[*TRAINERS, "export", "all"])
    parser.add_argument(
        "--steps",
        type=int,
        help="steps of this stage (default: the CPU recipe's; not with 'all')",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every default step count (for 'all')",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/default"),
        help="run directory (checkpoints, logs)",
    )
    parser.add_argument(
        "--export-to",
        type=Path,
        default=DEFAULT_MODEL,
        help="where 'export' writes the model",
    )
    parser.add_argument(
        "--from",
        dest="source",
        choices=["student", "distill", "consistency"],
        default=stages.SHIPPED_STAGE,
        help=f"which transformer 'export' ships (default: {stages.SHIPPED_STAGE})",
    )
    options.add(parser, "device")
    parser.add_argument(
        "--clips", type=int, default=512, help="clips in the latent training set"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--vae-scale",
        type=int,
        choices=sorted(stages.C.VAE_LEVELS),
        default=stages.C.Sizes.vae_scale,
        help="pixels per latent pixel (4: finer latents; pair it with --patch 4 to keep the token count)",
    )
    parser.add_argument(
        "--patch", type=int, default=stages.C.Sizes.patch, help="latent pixels per token side of the transformers"
    )
    parser.add_argument(
        "--layers", type=int, default=stages.C.Sizes.layers, help="transformer blocks of a teacher built here"
    )
    parser.add_argument(
        "--heads",
        type=int,
        default=stages.C.Sizes.heads,
        help=f"attention heads of a teacher built here (its width: heads x {stages.C.Sizes.head_dim}); at --patch 4 a"
        " token holds 256 latent values, and 8 heads keep them all",
    )
    parser.add_argument(
        "--ffn-dim", type=int, default=stages.C.Sizes.ffn_dim, help="feed-forward width of a teacher built here"
    )
    parser.add_argument(
        "--teacher-lr", type=float, default=Recipe.teacher_lr, help="the teacher stage's learning rate (also on resume)"
    )
    parser.add_argument(
        "--text-lr", type=float, help="the text encoder's rate in the teacher stage (default: the teacher's)"
    )
    parser.add_argument(
        "--binding-weight",
        type=float,
        default=Recipe.binding_weight,
        help="weight of the teacher stage's binding loss (each caption word predicts its object's attributes)",
    )
    parser.add_argument(
        "--vae-lr", type=float, help="the vae and decoder stages' learning rate (also on resume; default: the stage's)"
    )
    parser.add_argument(
        "--teacher-guidance",
        type=float,
        default=Recipe.teacher_guidance,
        help="classifier-free guidance of the teacher the causal stages distil (1: unguided)",
    )
    parser.add_argument(
        "--warm-start", type=Path, help="initialise from this run's finished stages"
    )
    parser.add_argument(
        "--minutes", type=float, help="time box per training stage (wall clock)"
    )
    options.add(parser, "threads")
    parser.set_defaults(threads=1)  # on a shared machine one thread per process beats contended thread pools by far
    args = parser.parse_args(argv)
    if args.steps is not None and args.stage == "all":
        parser.error("--steps applies to one stage; use --scale with 'all'")
    options.apply_threads(args)
    recipe = Recipe(
        root=args.out,
        device=torch.device(args.device) if args.device else default_device(),
        batch=args.batch,
        sizes=stages.C.Sizes(
            vae_scale=args.vae_scale, patch=args.patch, layers=args.layers, heads=args.heads, ffn_dim=args.ffn_dim
        ),
        clips=args.clips,
        teacher_lr=args.teacher_lr,
        text_lr=args.text_lr,
        binding_weight=args.binding_weight,
        vae_lr=args.vae_lr,
        teacher_guidance=args.teacher_guidance,
        export_to=args.export_to,
        minutes=args.minutes,
        warm_start=args.warm_start,
    )
    for stage in ALL if args.stage == "all" else (args.stage,):
        run_stage(
            recipe,
            stage,
            args.steps or round(DEFAULT_STEPS.get(stage, 0) * args.scale),
            args.source,
        )
    return 0


def run_stage(
    recipe: Recipe, stage: str, steps: int, source: str = stages.SHIPPED_STAGE
) -> None:
    """Run one stage (skipped when already finished) and append its wall time and final losses to `summary.jsonl`."""
    began = time.perf_counter()
    if stage == "export":
        result = stages.export(recipe, source)
    elif recipe.run(stage).done:
        print(
            f"{stage}: already finished ({recipe.run(stage).final}); delete it to retrain"
        )
        return
    else:
        result = TRAINERS[stage](recipe, steps)
    record = {
        "stage": stage,
        "steps": steps,
        "seconds": round(time.perf_counter() - began, 1),
    } | result
    print(json.dumps(record))
    with open(recipe.root / "summary.jsonl", "a") as summary:
        summary.write(json.dumps(record) + "\n")
