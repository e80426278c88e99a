"""Where a stream loses its prompt: the candidates of issue 11, measured per latent frame and per chunk.

For one model directory, on held-out grammar prompts:
  (a) the VAE alone: world clips encoded and decoded through the streaming decoder, PSNR per latent frame (the
      first encodes 1 video frame, the others 4) and whether the decoded background is still the captioned one;
  (b) latent statistics of the first latent frame against the later ones (the normalisation is one per channel);
  (c) the model's own stream from the prompt: per chunk, the fraction of prompts whose background is the
      captioned one (`world.background_name` of the frame borders) and the mean semantic score of the chunk;
  (d) the same after a clean world prefix (the clip's first two chunks, encoded, as the stream's past): a
      continuation of clean data against one of the model's own output (exposure bias);
  (e) how deep the stream's first latent frame reaches into the VAE decoder's output: mean |change| of each later
      latent frame's pixels when latent frame 0 alone is changed (the decoder's causal memory);
  (f) per attribute (background, count, and each object's colour, shape, size, direction, speed), how often the
      world's data, its VAE round trip and the model's stream agree with the caption over the whole stream: which
      attributes the score loses, and whether the VAE already loses them.

    python benchmarks/continuation.py --model DIR --label NAME [--prompts 8] [--chunks 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from quality import psnr  # the sibling script's, one PSNR for every benchmark
from streamgen.bench import load_average, save_report
from streamgen.pipeline import DEFAULT_MODEL, StreamingPipeline
from streamgen_train.data import EVAL_SEED
from streamgen_train.world.grammar import parse_caption
from streamgen_train.world.scene import VideoWorld
from streamgen_train.world.scorer import attribute_agreement, background_name, estimate_background, semantic_score
from streamgen.vae import StreamingDecoder, encode_video, to_uint8_frames

RESULTS = Path(__file__).parent / "results" / "quality_probes"
PREFIX_CHUNKS = 2  # latent frames 1 + 3 = 13 video frames of world data as the stream's past in (d)


def holds(frames: np.ndarray, caption: str) -> bool:
    """Whether the frames show the background the caption names."""
    return background_name(estimate_background(frames)) == parse_caption(caption).background


def per_chunk(streams: list[list[np.ndarray]], captions: list[str]) -> dict[str, list[float]]:
    """Per chunk index: fraction of prompts holding their background, and their mean semantic score."""
    chunks = range(len(streams[0]))
    return {
        "background": [float(np.mean([holds(s[k], c) for s, c in zip(streams, captions)])) for k in chunks],
        "semantic": [float(np.mean([semantic_score(s[k], c) for s, c in zip(streams, captions)])) for k in chunks],
    }


@torch.no_grad()
def measure(pipe: StreamingPipeline, prompts: int, chunks: int, steps: int) -> dict:
    world = VideoWorld(pipe.config.height, pipe.config.width)
    t_scale = pipe.latent_scale[0]
    sizes = [pipe.config.chunk_size(k) for k in range(chunks)]
    frames = 1 + t_scale * (sum(sizes) - 1)
    clips = [world.clip((EVAL_SEED, p), frames) for p in range(prompts)]
    captions = [caption for _, caption in clips]

    # (a) + (b): the VAE round trip of the world's own clips, decoded chunk by chunk like a stream.
    latents = [encode_video(pipe.vae, video).float() for video, _ in clips]
    vae_psnr, vae_streams = [], []
    for (video, _), z in zip(clips, latents):
        with StreamingDecoder(pipe.vae) as decoder:
            decoded = [to_uint8_frames(decoder.decode(part.to(pipe.vae.dtype)).float()) for part in z.split(sizes, 1)]
        rec = np.concatenate(decoded)
        starts = [0, *range(1, frames, t_scale)]
        vae_psnr.append([psnr(rec[s : s + (1 if s == 0 else t_scale)], video[s : s + (1 if s == 0 else t_scale)])
                         for s in starts])
        vae_streams.append(decoded)
    z = torch.cat(latents)  # (prompts, F, C, h, w)
    with StreamingDecoder(pipe.vae) as decoder:
        base = decoder.decode(z[:1].to(pipe.vae.dtype)).float()
    moved = z[:1].clone()
    moved[:, 0] = z[1:2, 0]  # another prompt's first frame
    with StreamingDecoder(pipe.vae) as decoder:
        change = (decoder.decode(moved.to(pipe.vae.dtype)).float() - base).abs().mean(dim=(0, 1, 3, 4))
    memory = [float(change[0]), *(float(change[s : s + t_scale].mean()) for s in range(1, frames, t_scale))]
    first, later = z[:, 0], z[:, 1:].flatten(0, 1)

    def stats(x: torch.Tensor) -> dict[str, float]:
        return {"mean_abs": float(x.mean(dim=(0, 2, 3)).abs().mean()), "std": float(x.std(dim=(0, 2, 3)).mean())}

    # (c) the model's own stream; (d) its continuation of the clip's first chunks.
    free, continued = [], []
    for p, (video, caption) in enumerate(clips):
        with pipe.start_session(caption, seed=p, steps=steps) as session:
            free.append([session.next_chunk() for _ in range(chunks)])
        prefix = video[: 1 + t_scale * (sum(sizes[:PREFIX_CHUNKS]) - 1)]
        with pipe.start_session(caption, seed=p, steps=steps, video=prefix) as session:
            continued.append([session.next_chunk() for _ in range(PREFIX_CHUNKS, chunks)])
    return {
        "vae_psnr_per_latent_frame": np.mean(vae_psnr, axis=0).round(2).tolist(),
        "vae_per_chunk": per_chunk(vae_streams, captions),
        "latent_stats": {"first": stats(first), "later": stats(later)},
        "decoder_memory_of_frame_0": np.round(memory, 4).tolist(),
        "stream_per_chunk": per_chunk(free, captions),
        "continuation_per_chunk": per_chunk(continued, captions),
        "per_attribute": {
            "world data": attribute_agreement([video for video, _ in clips], captions),
            "VAE round trip": attribute_agreement([np.concatenate(s) for s in vae_streams], captions),
            "model's stream": attribute_agreement([np.concatenate(s) for s in free], captions),
        },
    }


def render(report: dict) -> str:
    r = report["results"]
    chunks = len(r["stream_per_chunk"]["background"])

    def row(name: str, values: list[float], offset: int = 0) -> str:
        cells = ["" for _ in range(offset)] + [f"{v:.2f}" for v in values]
        return f"| {name} | " + " | ".join(cells) + " |"

    stats = r["latent_stats"]
    lines = [
        f"# Where the stream loses its prompt: {report['label']}",
        "",
        f"`python benchmarks/continuation.py {report['arguments']}`: {report['prompts']} held-out grammar prompts, "
        f"{report['steps']} steps, model `{report['model']}`; load average {report['load_average']}; "
        f"{report['seconds']} s.",
        "",
        "VAE round trip (streaming decoder), PSNR (dB) per latent frame: "
        + " / ".join(f"{v:.1f}" for v in r["vae_psnr_per_latent_frame"]),
        "",
        f"Normalised latents, first latent frame: mean |channel mean| {stats['first']['mean_abs']:.2f}, "
        f"channel std {stats['first']['std']:.2f}; later frames: {stats['later']['mean_abs']:.2f}, "
        f"{stats['later']['std']:.2f}.",
        "",
        "Decoder's memory of latent frame 0: mean |pixel change| (in [-1, 1] units) of each latent frame's video "
        "when only latent frame 0 is replaced: " + " / ".join(f"{v:.3f}" for v in r["decoder_memory_of_frame_0"]),
        "",
        "Per chunk (chunk 0 = 1 latent frame, then 3 each): fraction of prompts whose frames show the captioned "
        "background, and the mean semantic score of the chunk.",
        "",
        "| | " + " | ".join(f"chunk {k}" for k in range(chunks)) + " |",
        "| --- |" + " ---: |" * chunks,
        row("VAE round trip of world data: background", r["vae_per_chunk"]["background"]),
        row("VAE round trip: semantic", r["vae_per_chunk"]["semantic"]),
        row("model's stream: background", r["stream_per_chunk"]["background"]),
        row("model's stream: semantic", r["stream_per_chunk"]["semantic"]),
        row("after a clean world prefix: background", r["continuation_per_chunk"]["background"], PREFIX_CHUNKS),
        row("after a clean world prefix: semantic", r["continuation_per_chunk"]["semantic"], PREFIX_CHUNKS),
    ]
    kinds = list(r["per_attribute"]["world data"])
    lines += [
        "",
        "Per attribute, over the whole stream: fraction of captioned attributes of each kind the frames agree with.",
        "",
        "| | " + " | ".join(kinds) + " |",
        "| --- |" + " ---: |" * len(kinds),
        *(row(name, [values[k] for k in kinds]) for name, values in r["per_attribute"].items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--label", default="default")
    parser.add_argument(
        "--out", type=Path, help=f"report path, without suffix (default: {RESULTS.name}/continuation-LABEL)"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.prompts < 2:
        parser.error("--prompts must be at least 2: a probe swaps in another prompt's first frame")
    torch.set_num_threads(1)
    began = time.perf_counter()
    pipe = StreamingPipeline.from_pretrained(args.model, device="cpu")
    results = measure(pipe, args.prompts, args.chunks, args.steps)
    report = {
        "label": args.label,
        "arguments": f"--model {args.model} --label {args.label} --prompts {args.prompts} --chunks {args.chunks}",
        "model": str(args.model),
        "prompts": args.prompts,
        "steps": args.steps,
        "load_average": load_average(),
        "seconds": round(time.perf_counter() - began),
        "results": results,
    }
    save_report(args.out or RESULTS / f"continuation-{args.label}", report, render)


if __name__ == "__main__":
    main()
