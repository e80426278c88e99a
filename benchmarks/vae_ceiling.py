"""The VAE's ceiling: what any model decoded by a VAE can score, and how much of it the scorer itself allows.

A transformer makes latents; the VAE's decoder shows them. So a model's semantic score is bounded by the VAE's round
trip of the world's own clips (encode, then the streaming decoder, as `quality.py` measures it). This compares
VAEs on that bound, beside the scorer's own tolerance: the true clips blurred by a Gaussian of a few pixels, which a
sharp enough VAE would match. For each VAE, on `--prompts` held-out world clips (one training clip long):
PSNR, semantic score and agreement per attribute of the round trip; and the round-trip PSNR of real footage
(camera moves over the held-out photographs, as `footage.py` measures it).

    python benchmarks/vae_ceiling.py --vae NAME=DIR [NAME=DIR ...] [--prompts 64] [--label L]

DIR is a VAE's directory (`AutoencoderKLWan.save_pretrained`: a run's `vae/final/vae`, or a model's `vae`).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from scipy.ndimage import gaussian_filter

from footage import CLIPS_PER_IMAGE, CONTEXT_FRAMES
from quality import CLIP_LATENT_FRAMES, psnr, round_trip
from streamgen.bench import load_average, save_report
from streamgen_train import footage
from streamgen_train.data import EVAL_SEED
from streamgen_train.world.scene import VideoWorld
from streamgen_train.world.scorer import attribute_agreement, semantic_score

RESULTS = Path(__file__).parent / "results" / "quality_probes"
BLURS = (1.0, 1.5, 2.0)  # Gaussian sigma in pixels, per frame
FRAMES = 1 + 4 * (CLIP_LATENT_FRAMES - 1)  # one training clip: the first frame alone, then 4 per latent frame


def rate(videos: list[np.ndarray], truths: list[np.ndarray], captions: list[str]) -> dict:
    return {
        "psnr": float(np.mean([psnr(v, t) for v, t in zip(videos, truths)])),
        "semantic": float(np.mean([semantic_score(v, c) for v, c in zip(videos, captions)])),
        "attributes": attribute_agreement(videos, captions),
    }


@torch.no_grad()
def measure(vaes: dict[str, Path], prompts: int) -> dict:
    world = VideoWorld()
    clips = [world.clip((EVAL_SEED, p), FRAMES) for p in range(prompts)]
    truths, captions = [c[0] for c in clips], [c[1] for c in clips]
    shots = [footage.clip((EVAL_SEED, k), CONTEXT_FRAMES, world.height, world.width, names=(name,))
             for name in footage.HELD_OUT for k in range(CLIPS_PER_IMAGE)]
    rows = {}
    for sigma in BLURS:
        blurred = [np.clip(gaussian_filter(t.astype(np.float64), (0, sigma, sigma, 0)), 0, 255).round().astype(np.uint8)
                   for t in truths]
        rows[f"truth blurred {sigma:g} px"] = rate(blurred, truths, captions)
    for name, path in vaes.items():
        vae = AutoencoderKLWan.from_pretrained(path).eval()
        rows[name] = rate([round_trip(vae, t) for t in truths], truths, captions)
        rows[name]["footage_psnr"] = float(np.mean([psnr(round_trip(vae, s), s) for s in shots]))
    return rows


def render(report: dict) -> str:
    rows = report["rows"]
    kinds = list(next(iter(rows.values()))["attributes"])
    lines = [
        f"# VAE ceiling: {report['label']}",
        "",
        f"`python benchmarks/vae_ceiling.py {report['arguments']}`: {report['prompts']} held-out world clips of "
        f"{FRAMES} frames; footage: {CLIPS_PER_IMAGE} camera moves over each held-out "
        f"photograph ({', '.join(footage.HELD_OUT)}), {CONTEXT_FRAMES} frames. Load average {report['load_average']}; "
        f"{report['seconds']} s.",
        "",
        "| frames | world PSNR (dB) | semantic | " + " | ".join(kinds) + " | footage PSNR (dB) |",
        "| --- | ---: | ---: |" + " ---: |" * len(kinds) + " ---: |",
    ]
    for name, r in rows.items():
        footage_psnr = f"{r['footage_psnr']:.1f}" if "footage_psnr" in r else "-"
        lines.append(f"| {name} | {r['psnr']:.1f} | {r['semantic']:.2f} | "
                     + " | ".join(f"{r['attributes'][k]:.2f}" for k in kinds) + f" | {footage_psnr} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", nargs="+", required=True, help="NAME=DIR, one per VAE to compare")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--label", default="default")
    parser.add_argument("--out", type=Path, help=f"report path, without suffix (default: {RESULTS.name}/vae-ceiling-LABEL)")
    args = parser.parse_args()
    vaes = dict(spec.split("=", 1) for spec in args.vae)
    torch.set_num_threads(1)
    began = time.perf_counter()
    rows = measure({name: Path(path) for name, path in vaes.items()}, args.prompts)
    report = {
        "label": args.label,
        "arguments": shlex.join(["--vae", *args.vae, "--prompts", str(args.prompts), "--label", args.label]),
        "prompts": args.prompts,
        "load_average": load_average(),
        "seconds": round(time.perf_counter() - began),
        "rows": rows,
    }
    save_report(args.out or RESULTS / f"vae-ceiling-{args.label}", report, render)


if __name__ == "__main__":
    main()
