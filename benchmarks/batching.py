"""Batching across sessions in the chunk runner: total frames/s of 1, 2 and 4 streams, one turn for all (one
transformer call per step for every stream) against one turn per stream (the scheduler before batching).

Sessions differ in prompt, seed and budget (steps cycle through `--steps`), so a batch mixes (t, r) per sample.
Each mode gets its own sessions, warmed up by one chunk each (their first chunks are 1 latent frame, a batch of
their own); then `--rounds` rounds are timed. Reported: all sessions' frames per second end to end (denoise,
cache update, decode, H.264 encode) and per second of denoising alone (what batching changes). The server's
view of the same, over websockets and with overlap, is `benchmarks/serving.py`.

    python benchmarks/batching.py [--preset small] [--sessions 1,2,4] [--rounds 3] [--steps 2,4] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from itertools import cycle, islice
from pathlib import Path

import torch

from streamgen import bench, options
from streamgen.pipeline import StreamingPipeline
from streamgen.runtime import Runner, Stream

RESULTS = Path(__file__).parent / "results"


def open_streams(runner: Runner, count: int, budgets: list[int]) -> list[Stream]:
    streams = [
        Stream(f"{bench.PROMPT}, viewer {i}", seed=i, steps=steps) for i, steps in enumerate(islice(cycle(budgets), count))
    ]
    for stream in streams:
        runner.open(stream)
    runner.turn(streams)  # warm-up: the 1-frame first chunks
    return streams


def sync(pipe: StreamingPipeline) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


def measure(runner: Runner, count: int, budgets: list[int], rounds: int, batched: bool) -> dict:
    """`rounds` chunks of each of `count` streams: one turn of the runner for all, or one turn per stream."""
    streams = open_streams(runner, count, budgets)
    frames = denoise = 0.0
    sync(runner.pipe)
    start = time.perf_counter()
    for _ in range(rounds):
        for turn in [streams] if batched else [[stream] for stream in streams]:
            chunks = runner.turn(turn)
            denoise += chunks[0].timing.transformer  # one batched denoise for the turn
            frames += sum(chunk.frames for chunk in chunks)
    sync(runner.pipe)
    seconds = time.perf_counter() - start
    for stream in streams:
        runner.release(stream)
    return {"fps": frames / seconds, "denoise_fps": frames / denoise, "seconds": seconds, "frames": int(frames)}


def markdown(report: dict) -> str:
    m, model = report["machine"], report["model"]
    lines = [
        "# Batching sessions",
        "",
        f"`python benchmarks/batching.py {report['arguments']}`: {model['source']} at {model['width']}x"
        f"{model['height']}, {model['dtype']} on {m['device']} ({m.get('gpu') or m['cpu']}, {m['cpu_cores']} "
        f"cores, load average {m['load_average'][0]} to {m['load_average_end'][0]}; torch {m['torch']}). "
        f"Budgets {report['budgets']} per session in turn, {report['rounds']} timed rounds. Frames per second of all "
        "sessions together.",
        "",
        "| sessions | one at a time: fps | batched: fps | x | one at a time: denoise fps | batched: denoise fps | x |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        a, b = row["one_at_a_time"], row["batched"]
        lines.append(
            f"| {row['sessions']} | {a['fps']:.1f} | {b['fps']:.1f} | {b['fps'] / a['fps']:.2f} | "
            f"{a['denoise_fps']:.1f} | {b['denoise_fps']:.1f} | {b['denoise_fps'] / a['denoise_fps']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    options.add(source, "model")
    source.add_argument("--preset", default="small")
    p.add_argument("--sessions", default="1,2,4")
    p.add_argument("--steps", default="2,4", help="budgets, given to the sessions in turn")
    p.add_argument("--rounds", type=int, default=3)
    options.add(p, "device")
    p.add_argument("--out", type=Path, default=RESULTS / "batching_cpu")
    options.add(p, "threads")
    args = p.parse_args()
    options.apply_threads(args)
    pipe, source = bench.load(args.model, None if args.model else args.preset, args.device)
    budgets = bench.parse_ints(args.steps)
    machine = bench.machine(pipe.device)
    runner = Runner(pipe)
    # Warm the kernels for both paths once before timing anything.
    for batched in (False, True):
        measure(runner, 2, budgets, 1, batched)
    rows = []
    for count in bench.parse_ints(args.sessions):
        alone = measure(runner, count, budgets, args.rounds, batched=False)
        rows.append(
            {"sessions": count, "one_at_a_time": alone, "batched": measure(runner, count, budgets, args.rounds, True)}
        )
    machine["load_average_end"] = bench.load_average()
    report = {
        "arguments": " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": machine,
        "model": bench.describe(pipe, source),
        "budgets": budgets,
        "rounds": args.rounds,
        "rows": rows,
    }
    bench.save_report(args.out, report, markdown)


if __name__ == "__main__":
    main()
