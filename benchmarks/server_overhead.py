"""Where a served chunk's time goes (generation, H.264 encoding, sending) with 1, 2 and 4 concurrent sessions.

Sessions share one model and take turns chunk by chunk on one worker thread, so with n sessions each one's chunks
arrive about n times as far apart while the per-chunk split stays put; the server's own work (encode + send)
should be a small fraction of generation. One in-process server on loopback; `realtime: false` clients that
record to MP4 with the Python client. The model: `--model`, else the shipped default model when it exists, else
a random-weight preset (the same cost as a trained model of its shape).

    python benchmarks/server_overhead.py [--preset small] [--chunks 6] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AnyFlowFARPipeline

from streamgen import StreamConfig, StreamingPipeline, options, presets
from streamgen.bench import save_report
from streamgen.pipeline import DEFAULT_MODEL
from streamgen_client.client import StreamClient, record
from streamgen_server.app import serve_in_thread

SESSIONS = (1, 2, 4)
RESULTS = Path(__file__).parent / "results"


def load(args: argparse.Namespace, scratch: Path) -> tuple[StreamingPipeline, str]:
    """The model to serve, loaded the way `streamgen serve` loads one (a preset is saved first)."""
    directory = Path(args.model) if args.model else DEFAULT_MODEL
    preset = None if args.model or (DEFAULT_MODEL / "model_index.json").is_file() else presets.PRESETS[args.preset]
    if preset is not None:
        directory = scratch / args.preset
        AnyFlowFARPipeline(**presets.build(args.preset)).save_pretrained(directory)
    pipe = StreamingPipeline.from_pretrained(directory, device=args.device)
    if preset is not None:
        pipe.config = StreamConfig(height=preset.height, width=preset.width)
    if args.steps:
        pipe.config = pipe.config.replace(steps=args.steps)
    return pipe, f"{args.preset} preset (random weights)" if preset else directory.name


async def run_sessions(url: str, count: int, chunks: int, directory: Path) -> dict:
    """`count` sessions at once; per-chunk server stats, chunk arrival times, wall time."""
    arrivals: list[list[float]] = [[] for _ in range(count)]

    async def one(i: int):
        def arrived(message: dict) -> None:
            if message["type"] == "chunk":
                arrivals[i].append(time.perf_counter())

        async with await StreamClient.connect(url) as client:
            path = directory / f"{count}-{i}.mp4"
            return await record(client, path, prompt=f"session {i}", chunks=chunks, seed=i, on_message=arrived)

    began = time.perf_counter()
    recordings = await asyncio.gather(*(one(i) for i in range(count)))
    wall = time.perf_counter() - began
    stats = [c for r in recordings for c in r.chunks if c["chunk"] >= 1]  # full chunks; the first is 1 frame
    gaps = [b - a for times in arrivals for a, b in itertools.pairwise(times[1:])]  # between full chunks

    def mean_ms(*stages: str) -> float:
        return statistics.fmean(sum(c["latency_ms"][s] for s in stages) for c in stats)

    generation, encode, send = mean_ms("transformer", "cache", "decode"), mean_ms("encode"), mean_ms("send")
    frames = sum(r.frames for r in recordings)
    return {
        "sessions": count,
        "chunks_per_session": chunks,
        "frames_per_chunk": stats[0]["frames"],
        "generation_ms": generation,
        "encode_ms": encode,
        "send_ms": send,
        "server_overhead": (encode + send) / (generation + encode + send),
        "chunk_interval_ms": 1000 * statistics.fmean(gaps),
        "fps_per_session": frames / wall / count,
        "fps_total": frames / wall,
        "wall_s": wall,
    }


def machine(pipe: StreamingPipeline) -> str:
    device = pipe.device
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{where}, {torch.get_num_threads()} torch threads, torch {torch.__version__}{load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add(parser, "model")
    parser.add_argument("--preset", default="small", choices=sorted(presets.PRESETS))
    options.add(parser, "device")
    parser.add_argument("--steps", type=int, help="flow-map steps per chunk (default: the model's)")
    parser.add_argument("--chunks", type=int, default=6, help="chunks per session")
    parser.add_argument("--out", type=Path, default=RESULTS / "server_overhead", help="report path, without suffix")
    options.add(parser, "threads")
    args = parser.parse_args()
    if args.chunks < 3:
        parser.error("--chunks must be at least 3: the chunk interval is timed between full chunks (the first is 1 "
                     "frame)")  # fmt: skip
    options.apply_threads(args)
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        pipe, model = load(args, Path(tmp))
        with serve_in_thread(pipe, max_sessions=max(SESSIONS)) as server:
            asyncio.run(run_sessions(server.websocket_url, 1, 3, Path(tmp)))  # warm-up: first calls, allocator
            rows = [asyncio.run(run_sessions(server.websocket_url, n, args.chunks, Path(tmp))) for n in SESSIONS]
    config = pipe.config

    described = machine(pipe)
    lines = [
        f"# Server overhead per chunk: {model}, {config.width}x{config.height}, {config.steps} steps",
        "",
        f"Machine: {described}. One run, {args.chunks} chunks per session, loopback, `realtime: false` clients.",
        f"Per-chunk figures are means over the {rows[0]['frames_per_chunk']}-frame chunks, as the server measured",
        "them; the chunk interval is the time between a session's chunks arriving at its client.",
        "",
        "| sessions | generation (ms) | encode (ms) | send (ms) | encode + send | chunk interval (ms) "
        + "| fps per session | fps total |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['sessions']} | {r['generation_ms']:.1f} | {r['encode_ms']:.1f} | {r['send_ms']:.2f} "
            f"| {100 * r['server_overhead']:.1f}% | {r['chunk_interval_ms']:.0f} | {r['fps_per_session']:.1f} "
            f"| {r['fps_total']:.1f} |"
            for r in rows
        ),
    ]
    summary = {"machine": described, "model": model, "height": config.height, "width": config.width,
               "steps": config.steps, "rows": rows}  # fmt: skip
    save_report(args.out, summary, lambda _: "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
