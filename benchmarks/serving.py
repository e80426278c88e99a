"""Serving through the real server: what the chunk runner's batched turns deliver against one stream at a time,
with and without overlapping the decode and encode with the next turn's denoise, and whether "auto" sessions hold
their rate. Plus the computed per-session state of the Wan2.1-1.3B-shaped preset (nothing of it is run).

Each configuration is a fresh in-process server (`serve_in_thread`) over the shipped model, driven by Python
clients over loopback websockets, the way `streamgen serve` is:

* throughput: 1, 2 and 4 `realtime: false` clients (recorders, flat out) at the model's fixed budget; all frames
  received per wall second, and per session;
* punctuality: the same counts of `realtime: true` viewers with `steps: "auto"` at `--target-fps`. A viewer starts
  playing when its first full chunk arrives; a chunk is on time if it arrives before playback reaches its first
  frame (a late one stalls playback, which then goes on from there).

Modes: "one at a time" (`max_batch=1`: the scheduler before batching, least recently served first), "batched"
(every ready stream in one denoise per turn), each with and without overlap (decode and encode on a second
thread while the next turn denoises). All four servers are up at once and measured in turn, `--repeats` times,
so that on a shared machine they see the same load.

    python benchmarks/serving.py [--chunks 8] [--auto-chunks 16] [--sessions 1,2,4] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights

from streamgen import StreamConfig, StreamingPipeline, bench, options, presets
from streamgen.engine import SinkWindow
from streamgen.runtime import AUTO, session_bytes
from streamgen_client.client import StreamClient
from streamgen_server.app import serve_in_thread

RESULTS = Path(__file__).parent / "results"
MODES = {
    "one at a time": {"max_batch": 1, "overlap": False},  # the scheduler before the runner
    "one at a time + overlap": {"max_batch": 1, "overlap": True},
    "batched": {"overlap": False},
    "batched + overlap": {"overlap": True},  # the server's default
}


async def stream(url: str, index: int, chunks: int, **start) -> list[dict]:
    """One client: start, receive `chunks` generated chunks, stop. Per chunk: its stats and arrival time."""
    async with await StreamClient.connect(url) as client:
        await client.send("start", prompt=f"{bench.PROMPT}, viewer {index}", seed=index, **start)
        received, first_frame = [], {}
        while len(received) < chunks:
            message = await client.receive()
            if isinstance(message, tuple):
                if message[0]["kind"] == "chunk":
                    first_frame[message[0]["chunk"]] = message[0]["first_frame"]
            elif message["type"] == "chunk":
                received.append(message | {"arrived": time.perf_counter(), "first_frame": first_frame[message["chunk"]]})
            elif message["type"] == "error":
                raise RuntimeError(message)
        await client.send("stop")
        return received


async def clients(url: str, count: int, chunks: int, **start) -> tuple[list[list[dict]], float, float]:
    """Every client's chunks, the wall seconds they took, and the CPU seconds this process (server and clients)
    used meanwhile: on a shared machine, the part of the cost that other processes' load does not inflate."""
    began, cpu = time.perf_counter(), time.process_time()
    streams = await asyncio.gather(*(stream(url, i, chunks, **start) for i in range(count)))
    return streams, time.perf_counter() - began, time.process_time() - cpu


def on_time(chunks: list[dict], fps: float) -> list[bool]:
    """Per chunk after the first full one: did it arrive before playback (started at the first full chunk's
    arrival, stalling whenever a chunk is late) reached its first frame?"""
    full = [c for c in chunks if c["chunk"] >= 1]
    start, stalled, verdicts = full[0]["arrived"], 0.0, []
    for chunk in full[1:]:
        due = start + stalled + (chunk["first_frame"] - full[0]["first_frame"]) / fps
        verdicts.append(chunk["arrived"] <= due)
        stalled += max(0.0, chunk["arrived"] - due)
    return verdicts


def throughput(url: str, count: int, chunks: int) -> dict:
    streams, wall, cpu = asyncio.run(clients(url, count, chunks, realtime=False))
    frames = [sum(c["frames"] for c in chunks) for chunks in streams]
    batches = [c["batch"] for chunks in streams for c in chunks if c["chunk"] >= 1]
    return {
        "sessions": count,
        "fps_total": sum(frames) / wall,
        "frames_per_cpu_s": sum(frames) / cpu,
        "fps_per_session": [f / wall for f in frames],
        "batch_mean": statistics.fmean(batches),
        "wall_s": wall,
    }


def punctuality(url: str, count: int, chunks: int, target_fps: float) -> dict:
    streams, _, _ = asyncio.run(clients(url, count, chunks, realtime=True, steps=AUTO, target_fps=target_fps))
    verdicts = [v for chunks in streams for v in on_time(chunks, target_fps)]
    full = [[c for c in chunks if c["chunk"] >= 1] for chunks in streams]
    rates = [sum(c["frames"] for c in f[1:]) / (f[-1]["arrived"] - f[0]["arrived"]) for f in full]
    steps = [c["steps"] for f in full for c in f]
    return {
        "sessions": count,
        "on_time": sum(verdicts) / len(verdicts),
        "chunks_judged": len(verdicts),
        "fps_per_session": rates,
        "steps_mean": statistics.fmean(steps),
        "steps_min": min(steps),
        "steps_max": max(steps),
        "batch_mean": statistics.fmean(c["batch"] for f in full for c in f),
    }


def median(runs: list[dict]) -> dict:
    """The run with the median total rate, every run's rate, and the median frames per CPU second."""
    middle = sorted(runs, key=lambda r: r["fps_total"])[len(runs) // 2]
    efficiency = statistics.median(r["frames_per_cpu_s"] for r in runs)
    return middle | {"fps_total_runs": [r["fps_total"] for r in runs], "frames_per_cpu_s": efficiency}


def pooled(runs: list[dict]) -> dict:
    """All runs' chunks judged together; rates and steps averaged over the runs."""
    judged = sum(r["chunks_judged"] for r in runs)
    return {
        "sessions": runs[0]["sessions"],
        "on_time": sum(r["on_time"] * r["chunks_judged"] for r in runs) / judged,
        "chunks_judged": judged,
        "fps_per_session": [statistics.fmean(rates) for rates in zip(*(r["fps_per_session"] for r in runs))],
        "steps_mean": statistics.fmean(r["steps_mean"] for r in runs),
        "steps_min": min(r["steps_min"] for r in runs),
        "steps_max": max(r["steps_max"] for r in runs),
        "batch_mean": statistics.fmean(r["batch_mean"] for r in runs),
    }


def preset_state(name: str) -> dict:
    """Bytes one session of a preset holds at its resolution, in bf16 as served on a GPU: computed on the meta
    device (shapes only). `before`: the previous layout, which kept each chunk's pre-RoPE keys/values as well
    as the rotated context slabs."""
    with init_empty_weights():  # parameters on the meta device: no memory, no initialisation
        components = presets.build(name)
    for key in ("transformer", "vae", "text_encoder"):
        components[key].to(dtype=torch.bfloat16)  # shapes only: every parameter's dtype as served
    p = presets.PRESETS[name]
    pipe = StreamingPipeline(**components, config=StreamConfig(height=p.height, width=p.width))
    config = pipe.config
    scale = pipe.latent_scale[1]
    policy = SinkWindow(config.sink, config.window)
    cache = pipe.engine.new_cache((p.height // scale, p.width // scale), config.chunk_frames, policy)
    kv = pipe.engine.cache_bytes(cache, rows=1)
    chunk_tokens = config.chunk_frames * cache.tokens_per_frame[0]
    slab = 2 * p.layers * p.heads * p.head_dim * 2  # bytes per token of context: keys and values, all layers
    total = session_bytes(pipe, config)
    return {
        "preset": name,
        "resolution": f"{p.width}x{p.height}",
        "context_tokens": cache.capacity_tokens - chunk_tokens,
        "session_gib": total / 2**30,
        "kv_gib": kv / 2**30,
        "decoder_gib": (total - kv) / 2**30,
        "before_gib": (total + (cache.capacity_tokens - chunk_tokens) * slab) / 2**30,
    }


def markdown(report: dict) -> str:
    m, model = report["machine"], report["model"]
    lines = [
        "# Serving through the real server",
        "",
        f"`python benchmarks/serving.py {report['arguments']}` ({report['seconds']:.0f} s): {model['source']} model at "
        f"{model['width']}x{model['height']}, {model['fps']} fps, {report['steps']} steps for the recorders; "
        f"{m['device']} ({m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch thread(s), load average "
        f"{m['load_average'][0]} to {m['load_average_end'][0]}: a shared machine, so compare within this run). "
        f"One server per mode, all up at once; Python clients over loopback websockets; each cell run "
        f"{report['repeats']} times, the modes interleaved so that they share the machine's load.",
        "",
        f"## Throughput: `realtime: false` recorders, {report['chunks']} chunks each",
        "",
        "Frames per second of all sessions (per session) in the median run, and that against one at a time. Below, "
        "frames per CPU second of the process (server and clients; median), which other processes' load inflates "
        "far less than the wall clock: what batching saves. Overlap saves no CPU time, it uses a second core; only "
        "the wall clock can show it, and only when a core is free.",
        "",
        "| sessions | " + " | ".join(MODES) + " |",
        "|---:|" + "---:|" * len(MODES),
    ]
    for rows in zip(*(report["throughput"][mode] for mode in MODES)):
        base = rows[0]["fps_total"]
        cells = [
            f"{r['fps_total']:.1f} ({', '.join(f'{x:.1f}' for x in r['fps_per_session'])}), {r['fps_total'] / base:.2f}x"
            for r in rows
        ]
        lines.append(f"| {rows[0]['sessions']} | " + " | ".join(cells) + " |")
    lines += ["", "| sessions | " + " | ".join(f"{mode}: frames per CPU s" for mode in MODES) + " |"]
    lines.append("|---:|" + "---:|" * len(MODES))
    for rows in zip(*(report["throughput"][mode] for mode in MODES)):
        base = rows[0]["frames_per_cpu_s"]
        cells = [f"{r['frames_per_cpu_s']:.1f}, {r['frames_per_cpu_s'] / base:.2f}x" for r in rows]
        lines.append(f"| {rows[0]['sessions']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Punctuality: `realtime: true` viewers, `steps: \"auto\"` at {report['target_fps']:g} fps, "
        f"{report['auto_chunks']} chunks each",
        "",
        "A chunk is on time if it arrives before the viewer's playback (from the first full chunk on, stalling when "
        "late) reaches it; all runs' chunks pooled, rates and steps averaged over the runs.",
        "",
        "| mode | sessions | chunks on time | fps per session | steps mean (min-max) | chunks per batch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for r in report["punctuality"][mode]:
            lines.append(
                f"| {mode} | {r['sessions']} | {100 * r['on_time']:.0f}% of {r['chunks_judged']} | "
                f"{', '.join(f'{x:.1f}' for x in r['fps_per_session'])} | {r['steps_mean']:.1f} ({r['steps_min']}-"
                f"{r['steps_max']}) | {r['batch_mean']:.2f} |"
            )
    s = report["preset_state"]
    lines += [
        "",
        "## State per session, computed",
        "",
        f"`{s['preset']}` preset at {s['resolution']}, bf16, the default window (sink 1 + 4 compressed chunks, 2 full): "
        f"{s['session_gib']:.2f} GiB per session ({s['kv_gib']:.2f} GiB KV context, one copy of "
        f"{s['context_tokens']} tokens plus one chunk's room, and retained latents; {s['decoder_gib']:.2f} GiB VAE "
        f"decoder state), against {s['before_gib']:.2f} GiB when each chunk's keys were kept beside the rotated "
        "slabs. This is what the server reserves per session under `--memory-budget`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options.add(p, "model")
    p.add_argument("--sessions", default="1,2,4")
    p.add_argument("--chunks", type=int, default=8, help="chunks per recorder")
    p.add_argument("--auto-chunks", type=int, default=16, help="chunks per auto viewer")
    p.add_argument("--target-fps", type=float, default=16.0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each cell, modes interleaved")
    options.add(p, "device", "threads")
    p.add_argument("--out", type=Path, default=RESULTS / "serving")
    args = p.parse_args()
    if min(args.chunks, args.auto_chunks) < 3:
        p.error("--chunks and --auto-chunks must be at least 3: rates are timed between full chunks (the first is 1 "
                "frame)")  # fmt: skip
    options.apply_threads(args)
    torch.set_grad_enabled(False)
    pipe, source = bench.load(args.model, None, args.device)
    counts = bench.parse_ints(args.sessions)
    machine = bench.machine(pipe.device)
    started = time.perf_counter()
    throughputs = {mode: {n: [] for n in counts} for mode in MODES}
    punctualities = {mode: {n: [] for n in counts} for mode in MODES}
    with contextlib.ExitStack() as stack:
        # One server per mode, all up at once, measured in turn: the modes share whatever load the machine has.
        servers = {
            mode: stack.enter_context(serve_in_thread(pipe, max_sessions=max(counts), **options))
            for mode, options in MODES.items()
        }
        for server in servers.values():
            asyncio.run(clients(server.websocket_url, 1, 3, realtime=False))  # warm-up: first calls, allocator
        for repeat in range(args.repeats):
            for n in counts:
                for mode, server in servers.items():
                    throughputs[mode][n].append(throughput(server.websocket_url, n, args.chunks))
                    auto = punctuality(server.websocket_url, n, args.auto_chunks, args.target_fps)
                    punctualities[mode][n].append(auto)
                    print(f"repeat {repeat}, {n} sessions, {mode}: {throughputs[mode][n][-1]['fps_total']:.1f} fps, "
                          f"{100 * auto['on_time']:.0f}% on time", flush=True)  # fmt: skip
    report = {
        "throughput": {mode: [median(runs[n]) for n in counts] for mode, runs in throughputs.items()},
        "punctuality": {mode: [pooled(runs[n]) for n in counts] for mode, runs in punctualities.items()},
    }
    machine["load_average_end"] = bench.load_average()
    report |= {
        "arguments": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": machine,
        "model": bench.describe(pipe, source),
        "steps": pipe.config.steps,
        "chunks": args.chunks,
        "auto_chunks": args.auto_chunks,
        "repeats": args.repeats,
        "target_fps": args.target_fps,
        "seconds": time.perf_counter() - started,
        "preset_state": preset_state("wan-1.3b"),
    }
    bench.save_report(args.out, report, markdown)


if __name__ == "__main__":
    main()
