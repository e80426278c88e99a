"""A strip of frames a person can judge: one stream per step budget, the last frame of chosen chunks.

Rows are step budgets (same prompt, seed and noise), columns chunks of the stream; each row ends with the world's
own rendering of the prompt for comparison. README's "What it draws" shows it.

    python benchmarks/strip.py [--model DIR] [--prompt TEXT] [--steps 1,4,16] [--out docs/what_it_draws.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from streamgen.pipeline import DEFAULT_MODEL, StreamingPipeline
from streamgen_train.world.grammar import CaptionSpec, parse_caption
from streamgen_train.world.scene import Scene, render, sample_scene

CHUNKS = (0, 1, 2, 4, 8, 16)
LABEL = 14  # pixels of the label column's text rows (at 2x)


def reference(spec: CaptionSpec, height: int, width: int) -> np.ndarray:
    """A world frame of the prompt: any scene whose caption it is (positions are the world's own draw)."""
    for seed in range(10_000):
        scene = sample_scene(seed, num_objects=len(spec.objects))
        if scene.spec.objects == spec.objects:
            return render(Scene(scene.objects, spec.background), 1, height, width)[0]
    raise ValueError(f"no world scene matches {spec.caption!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--prompt", default="a large red circle moving right slowly on a gray background")
    parser.add_argument("--steps", default="1,4,16")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/what_it_draws.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = StreamingPipeline.from_pretrained(args.model, device="cpu")
    spec = parse_caption(args.prompt)
    if spec is None:
        raise SystemExit(f"not a grammar prompt: {args.prompt!r}")
    h, w = pipe.config.height, pipe.config.width
    gap = np.full((h, 4, 3), 255, np.uint8)
    rows = []
    with torch.no_grad():
        for steps in (int(s) for s in args.steps.split(",")):
            with pipe.start_session(args.prompt, seed=args.seed, steps=steps) as session:
                chunks = [session.next_chunk() for _ in range(max(CHUNKS) + 1)]
            rows.append(np.concatenate([*(chunks[k][-1] for k in CHUNKS), gap, reference(spec, h, w)], axis=1))
    sheet = np.concatenate(rows, axis=0)
    image = Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST)
    canvas = Image.new("RGB", (image.width + 90, image.height + 2 * LABEL), "white")
    canvas.paste(image, (90, LABEL))
    draw = ImageDraw.Draw(canvas)
    for i, k in enumerate(CHUNKS):
        draw.text((90 + i * 2 * w + 4, 1), f"chunk {k}", fill="black")
    draw.text((90 + len(CHUNKS) * 2 * w + 12, 1), "world", fill="black")
    for i, steps in enumerate(args.steps.split(",")):
        draw.text((4, LABEL + i * 2 * h + h - 6), f"{steps} step{'s' * (steps != '1')}", fill="black")
    draw.text((4, image.height + LABEL + 1), f'"{args.prompt}", seed {args.seed}', fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(256).save(args.out)  # a palette keeps the PNG small
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
