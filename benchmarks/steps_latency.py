"""Step budget against latency: where a chunk's time goes, time to first frame and sustained fps, for budgets
1, 2, 4, 8, 16, next to diffusers' `AnyFlowFARPipeline` making the same video on the same components.

Both make 85 frames: chunks of [1, 3, 3, 3, 3, 3, 3, 3] latent frames (the session's own partition, so both
run the same work). The reference decodes at the end, so its time to first frame is its whole run. Measuring is
`streamgen.bench`'s (warm-up excluded, per-chunk split, H.264 encode included).

    python benchmarks/steps_latency.py [--preset small | --model DIR] [--steps 1,2,4,8,16] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import torch

from streamgen import bench, options
from streamgen.pipeline import DEFAULT_MODEL, StreamingPipeline
from streamgen.runtime import Runner

RESULTS = Path(__file__).parent / "results"


def reference_seconds(pipe: StreamingPipeline, steps: int, chunks: list[int]) -> float:
    """Wall time of diffusers' pipeline for the same video: prompt to frames (the whole run, decode at the end)."""
    reference = pipe.as_reference()
    reference.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    reference(
        prompt=f"{bench.PROMPT}, reference {steps}",
        height=pipe.config.height,
        width=pipe.config.width,
        num_frames=pipe.latent_scale[0] * (sum(chunks) - 1) + 1,
        num_inference_steps=steps,
        chunk_partition=chunks,
        guidance_scale=1.0,  # guidance is distilled into the weights: no negative prompt pass
        max_sequence_length=pipe.prompts.max_sequence_length,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter() - start


def markdown(report: dict) -> str:
    m, model = report["machine"], report["model"]
    frames = report["frames"]
    lines = [
        "# Step budget against latency",
        "",
        f"`python benchmarks/steps_latency.py {report['arguments']}` on {date.today().isoformat()}: "
        f"{model['source']} ({model['transformer_parameters_m']:.1f}M-parameter transformer, {model['weights']} "
        f"weights) at {model['width']}x{model['height']}, {model['dtype']} on {m['device']} "
        f"({m.get('gpu') or m['cpu']}, {m['cpu_cores']} cores, load average {m['load_average'][0]} at the start "
        f"and {m['load_average_end'][0]} at the end; "
        f"torch {m['torch']}, diffusers {m['diffusers']}).",
        "",
        f"Both make the same {frames}-frame video ({len(report['partition'])} chunks {report['partition']}). "
        "Ours: per-chunk p50 over the chunks after the first, in ms; first frame = prompt to the first chunk's "
        "H.264 fragment. Reference (`AnyFlowFARPipeline`, no H.264 encode): it shows nothing until its whole run "
        "is done.",
        "",
        "| steps | transformer | cache | decode | encode | chunk total (p95) | first frame | fps | "
        "reference first frame | reference fps | first frame, x sooner |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, ref in zip(report["budgets"], report["reference_s"]):
        lat = row["latency_ms"]
        lines.append(
            f"| {row['steps']} | {lat['transformer']['p50']:.0f} | {lat['cache']['p50']:.0f} | "
            f"{lat['decode']['p50']:.0f} | {lat['encode']['p50']:.0f} | {lat['total']['p50']:.0f} "
            f"({lat['total']['p95']:.0f}) | {row['time_to_first_frame_s']:.2f} s | {row['fps']:.1f} | "
            f"{ref:.1f} s | {frames / ref:.1f} | {ref / row['time_to_first_frame_s']:.0f} |"
        )
    share = [r["latency_ms"]["decode"]["p50"] / r["latency_ms"]["total"]["p50"] for r in report["budgets"]]
    lines += [
        "",
        f"The VAE decode is {min(share):.0%} to {max(share):.0%} of a chunk's time across budgets; the real-time "
        f"rate is {model['fps']} fps (a {model['chunk_video_frames']}-frame chunk every "
        f"{1000 * model['chunk_video_frames'] / model['fps']:.0f} ms). Raw figures: `steps_latency.json`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    options.add(source, "model")
    source.add_argument("--preset")
    p.add_argument("--steps", default="1,2,4,8,16")
    p.add_argument("--chunks", type=int, default=8, help="chunks of the video (8: 85 frames)")
    p.add_argument("--warmup", type=int, default=1)
    options.add(p, "device")
    p.add_argument("--out", type=Path, default=RESULTS / "steps_latency")
    options.add(p, "threads")
    args = p.parse_args()
    options.apply_threads(args)
    preset = args.preset or (None if args.model or (DEFAULT_MODEL / "model_index.json").is_file() else "small")
    pipe, source = bench.load(args.model, preset, args.device)
    chunks = pipe.config.partition(args.chunks)
    budgets = bench.parse_ints(args.steps)
    runner = Runner(pipe)
    report = {
        "arguments": " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": bench.machine(pipe.device),
        "model": bench.describe(pipe, source),
        "partition": chunks,
        "frames": pipe.latent_scale[0] * (sum(chunks) - 1) + 1,
        "budgets": [bench.measure_budget(runner, steps, args.chunks, args.warmup) for steps in budgets],
        "reference_s": [reference_seconds(pipe, steps, chunks) for steps in [1, *budgets]][1:],  # 1st: warm-up
    }
    report["machine"]["load_average_end"] = bench.load_average()
    bench.save_report(args.out, report, markdown)


if __name__ == "__main__":
    main()
