"""Real footage through a model: VAE reconstruction PSNR and continuation, on photographs no stage trained on.

Clips are camera moves over scikit-image's held-out photographs (`streamgen_train.footage.HELD_OUT`) at the
model's resolution. For each: (a) PSNR of the VAE round trip (encode, then the streaming decoder, as an uploaded
clip is shown); (b) the stream continuing the clip's first 13 frames with the empty prompt, PSNR of each
continuation chunk against what the camera really saw next and the distance of its mean colour from the truth's
(does it keep its colours?). A contact sheet shows truth, reconstruction and continuation side by side.

    python benchmarks/footage.py --model DIR --label NAME [--sheet docs/footage.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from quality import psnr  # the sibling script's, one PSNR for every benchmark
from streamgen.bench import load_average, save_report
from streamgen.pipeline import DEFAULT_MODEL, StreamingPipeline
from streamgen_train import footage
from streamgen_train.data import EVAL_SEED
from streamgen.vae import StreamingDecoder, encode_video, to_uint8_frames

RESULTS = Path(__file__).parent / "results" / "quality_probes"
CONTEXT_FRAMES = 13  # the stream's first two chunks (1 + 3 latent frames)
CONTINUED_CHUNKS = 4
CLIPS_PER_IMAGE = 2


@torch.no_grad()
def measure(pipe: StreamingPipeline, steps: int) -> tuple[dict, list[np.ndarray]]:
    height, width = pipe.config.height, pipe.config.width
    chunk_video = pipe.latent_scale[0] * pipe.config.chunk_frames
    total = CONTEXT_FRAMES + CONTINUED_CHUNKS * chunk_video
    rec_psnr, cont_psnr, cont_colour, rows = [], [], [], []
    for name in footage.HELD_OUT:
        for k in range(CLIPS_PER_IMAGE):
            truth = footage.clip((EVAL_SEED, k), total, height, width, names=(name,))
            context = truth[:CONTEXT_FRAMES]
            with StreamingDecoder(pipe.vae) as decoder:
                rec = to_uint8_frames(decoder.decode(encode_video(pipe.vae, context).to(pipe.vae.dtype)).float())
            rec_psnr.append(psnr(rec, context))
            with pipe.start_session("", seed=k, steps=steps, video=context) as session:
                chunks = [session.next_chunk() for _ in range(CONTINUED_CHUNKS)]
            later = [truth[CONTEXT_FRAMES + i * chunk_video : CONTEXT_FRAMES + (i + 1) * chunk_video]
                     for i in range(CONTINUED_CHUNKS)]
            cont_psnr.append([psnr(c, t) for c, t in zip(chunks, later)])
            cont_colour.append([float(np.linalg.norm(c.reshape(-1, 3).mean(0) - t.reshape(-1, 3).mean(0)))
                                for c, t in zip(chunks, later)])
            # Sheet row: truth at frame 12 and the end of each chunk, then the same of reconstruction/stream.
            pick = [CONTEXT_FRAMES - 1, *(CONTEXT_FRAMES + (i + 1) * chunk_video - 1 for i in range(CONTINUED_CHUNKS))]
            made = [rec[-1], *(c[-1] for c in chunks)]
            rows.append(np.concatenate([*truth[pick], np.full((height, 4, 3), 255, np.uint8), *made], axis=1))
    results = {
        "clips": len(rec_psnr),
        "reconstruction_psnr": float(np.mean(rec_psnr)),
        "reconstruction_psnr_per_clip": np.round(rec_psnr, 2).tolist(),
        "continuation_psnr_per_chunk": np.mean(cont_psnr, axis=0).round(2).tolist(),
        "continuation_colour_error_per_chunk": np.mean(cont_colour, axis=0).round(1).tolist(),
    }
    return results, rows


def render(report: dict) -> str:
    r = report["results"]
    chunks = len(r["continuation_psnr_per_chunk"])
    return "\n".join([
        f"# Real footage: {report['label']}",
        "",
        f"`python benchmarks/footage.py {report['arguments']}`: {r['clips']} clips (camera moves over the held-out "
        f"photographs {', '.join(footage.HELD_OUT)}), {report['steps']} steps, model `{report['model']}`; load "
        f"average {report['load_average']}; {report['seconds']} s.",
        "",
        f"VAE round trip of the first {CONTEXT_FRAMES} frames: **{r['reconstruction_psnr']:.1f} dB** "
        f"(per clip: {', '.join(f'{v:.1f}' for v in r['reconstruction_psnr_per_clip'])}).",
        "",
        "Continuation with the empty prompt, per chunk after the clip (12 frames each): PSNR against what the camera "
        "saw next, and the distance (RGB, 0-441) of the chunk's mean colour from the truth's.",
        "",
        "| | " + " | ".join(f"chunk +{k + 1}" for k in range(chunks)) + " |",
        "| --- |" + " ---: |" * chunks,
        "| PSNR (dB) | " + " | ".join(f"{v:.1f}" for v in r["continuation_psnr_per_chunk"]) + " |",
        "| mean-colour error | " + " | ".join(f"{v:.1f}" for v in r["continuation_colour_error_per_chunk"]) + " |",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--label", default="default")
    parser.add_argument("--out", type=Path, help=f"report path, without suffix (default: {RESULTS.name}/footage-LABEL)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sheet", type=Path, help="write the contact sheet (PNG) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    pipe = StreamingPipeline.from_pretrained(args.model, device="cpu")
    results, rows = measure(pipe, args.steps)
    report = {
        "label": args.label,
        "arguments": f"--model {args.model} --label {args.label}" + (f" --sheet {args.sheet}" if args.sheet else ""),
        "model": str(args.model),
        "steps": args.steps,
        "load_average": load_average(),
        "seconds": round(time.perf_counter() - began),
        "results": results,
    }
    save_report(args.out or RESULTS / f"footage-{args.label}", report, render)
    if args.sheet is not None:
        sheet = np.concatenate(rows, axis=0)
        Image.fromarray(sheet).quantize(256).save(args.sheet)  # a palette keeps the PNG small


if __name__ == "__main__":
    main()
