"""Scaling out on Ray Serve: total fps delivered to 2 and 4 sessions by 1 and 2 replicas, and the latency that Ray's
proxy adds to a chunk, against the plain server.

Three servers run side by side, idle but for the one measured: the plain server (`streamgen serve`, a process of
its own), and on one local Ray instance the deployment of `streamgen serve --ray` twice, as two applications
behind Ray's proxy: one of 1 replica (route /one) and one of 2 (route /two). Each replica stands for a device:
it is pinned to a core of its own (all its threads: denoising, and decoding and encoding overlapped with it),
as is the plain server, with one torch thread and at most 4 sessions. The measurements go round the servers in
turn, `--rounds` times, and the report gives medians: the machine is shared, so compare side by side.

- Throughput: N `realtime: false` recorders at once (loopback), `--chunks` chunks each; fps = frames / wall time.
- Added latency: control round trips on a paused session (no generation in the way): the loopback socket for the
  plain server, plus the hop through Ray's proxy, in and out, for a replica. A chunk's media takes the same way out.

On a 2-core machine 2 replicas can at most double 1 (and batching inside one replica already uses its core well);
the point is that the same command scales on a bigger machine or a cluster. Needs the ray extra.

    python benchmarks/scale.py [--model DIR] [--sessions 2,4] [--chunks 6] [--rounds 3] [--samples 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

from streamgen import bench, cli, options
from streamgen_client.client import StreamClient, record
from streamgen_server import rayserve

RESULTS = Path(__file__).parent / "results"
SLOTS = 4  # --max-sessions of the plain server and of each replica
QUIET_SECONDS = 0.5  # no message for this long: nothing left in flight


@contextlib.contextmanager
def serving(argv: list[str], ready_seconds: float = 300) -> Iterator[str]:
    """`streamgen serve ARGV` in its own process; yields its websocket URL, stops it with SIGTERM."""
    port = free_port()
    command = [sys.executable, "-m", "streamgen.cli", "serve", "--port", str(port), "--max-sessions", str(SLOTS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    pin(process.pid, 0)  # before it starts any other thread
    try:
        deadline = time.monotonic() + ready_seconds
        for line in process.stdout:
            if "streamgen serving" in line:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamgen serve {' '.join(argv)} did not start")
        else:
            raise RuntimeError(f"streamgen serve {' '.join(argv)} exited with {process.wait()}")
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def throughput(url: str, sessions: int, chunks: int, scratch: Path) -> dict:
    """`sessions` recorders at once: total fps delivered, and how many sessions each replica served."""

    async def one(i: int):
        async with await StreamClient.connect(url) as client:
            return await record(client, scratch / f"s{i}.mp4", prompt=f"scene {i}", chunks=chunks, seed=i)

    start = time.perf_counter()
    recordings = await asyncio.gather(*(one(i) for i in range(sessions)))
    wall = time.perf_counter() - start
    frames = sum(recording.frames for recording in recordings)
    replicas = Counter(next(e for e in r.events if e["type"] == "started").get("replica") for r in recordings)
    return {"sessions": sessions, "frames": frames, "seconds": round(wall, 3), "fps": round(frames / wall, 2),
            "sessions_per_replica": sorted(replicas.values(), reverse=True)}  # fmt: skip


async def round_trips(url: str, samples: int) -> list[float]:
    """Times in ms from a control message to its answer (`pause` -> `paused` on a paused session: no generation
    involved, so this is the transport alone, in and out)."""
    async with await StreamClient.connect(url) as client:
        await client.start("a paper boat", realtime=False)
        await client.send("pause")
        with contextlib.suppress(TimeoutError):
            while True:  # what was generated before the pause arrives; then nothing for a while
                await asyncio.wait_for(client.receive(), QUIET_SECONDS)
        times = []
        for _ in range(samples):
            sent = time.perf_counter()
            await client.send("pause")
            while not isinstance(message := await client.receive(), dict) or message["type"] != "paused":
                pass
            times.append(1000 * (time.perf_counter() - sent))
            await asyncio.sleep(0.05)
        await client.send("stop")
    return times


def pin(pid: int, core: int) -> None:
    """Every thread of process `pid` (and so every thread they start) on `core` only."""
    for thread in psutil.Process(pid).threads():
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(thread.id, {core})


def replica_pids(app: str) -> list[int]:
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][app]["deployments"]
    return sorted(replica["pid"] for deployment in deployments.values() for replica in deployment["replicas"])


@contextlib.contextmanager
def on_ray(model: list[str]) -> Iterator[dict[str, str]]:
    """A local Ray instance (a CPU per replica, no dashboard) with a 1-replica and a 2-replica deployment behind
    one proxy; yields their websocket URLs. Ray is shut down on the way out."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        urls = {}
        for name, replicas in (("one", 1), ("two", 2)):
            args = cli.build_parser().parse_args(["serve", *model, "--ray", "--replicas", str(replicas),
                                                  "--replica-cpus", "1", "--max-sessions", str(SLOTS),
                                                  "--port", str(port)])  # fmt: skip
            serve.run(rayserve.application(args), name=name, route_prefix=f"/{name}")
            for core, pid in enumerate(replica_pids(name)):
                pin(pid, core)
            urls[f"Ray, {replicas} replica{'s' if replicas > 1 else ''}"] = f"ws://127.0.0.1:{port}/{name}/ws"
        yield urls
    finally:
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(urls: dict[str, str], args: argparse.Namespace, scratch: Path) -> dict:
    """Every measurement round-robin over the servers, `--rounds` times; medians per server."""
    counts = bench.parse_ints(args.sessions)
    runs: dict[str, dict] = {name: {"throughput": {n: [] for n in counts}, "round_trip": []} for name in urls}
    for url in urls.values():
        asyncio.run(throughput(url, SLOTS, 2, scratch))  # warm-up: first calls, allocator, every replica
    for _ in range(args.rounds):
        for name, url in urls.items():
            for n in counts:
                runs[name]["throughput"][n].append(asyncio.run(throughput(url, n, args.chunks, scratch)))
            runs[name]["round_trip"] += asyncio.run(round_trips(url, args.samples))
    results = {}
    for name, run in runs.items():
        rows = []
        for n, measured in run["throughput"].items():
            rows.append({"sessions": n, "fps": round(statistics.median(m["fps"] for m in measured), 2),
                         "fps_each_round": [m["fps"] for m in measured],
                         "sessions_per_replica": [m["sessions_per_replica"] for m in measured]})  # fmt: skip
        times = run["round_trip"]
        latency = {"samples": len(times), "round_trip_ms": round(statistics.median(times), 2),
                   "p90_ms": round(statistics.quantiles(times, n=10)[-1], 2)}  # fmt: skip
        results[name] = {"throughput": rows, "latency": latency}
    return results


def render(report: dict) -> str:
    configs = report["configs"]
    plain = configs["plain server"]
    lines = [
        "# Scaling out on Ray Serve",
        "",
        f"`python benchmarks/scale.py {' '.join(report['argv'])}`: model {report['model']}, {report['chunks']} chunks",
        f"per session; the plain server and each replica pinned to a core of its own (replica = device), one torch",
        f"thread, at most {SLOTS} sessions each; the three",
        f"servers measured in turn, {report['rounds']} times round, medians. Machine: {report['machine']['cpu']},",
        f"{report['machine']['cpu_cores']} cores, load average before {report['machine']['load_average']} and",
        f"after {report['load_average_after']} (shared: compare within this table).",
        "",
        "## Total fps delivered",
        "",
        "| server | sessions | fps (median) | x plain | fps each round | sessions per replica, each round |",
        "|---|---:|---:|---:|---|---|",
    ]
    for name, result in configs.items():
        for row, base in zip(result["throughput"], plain["throughput"]):
            placements = ", ".join("+".join(map(str, p)) for p in row["sessions_per_replica"])
            each = ", ".join(f"{fps:.1f}" for fps in row["fps_each_round"])
            lines.append(
                f"| {name} | {row['sessions']} | {row['fps']:.1f} | {row['fps'] / base['fps']:.2f} | {each} "
                f"| {placements} |"
            )
    lines += [
        "",
        f"## Latency the proxy adds ({plain['latency']['samples']} control round trips each: `pause` -> `paused`)",
        "",
        "A chunk takes the same path out (replica, proxy, client) as an answer, and a prompt or step change the",
        "same path in, so this is the proxy's share of a change's way to the screen.",
        "",
        "| server | round trip, median (ms) | p90 (ms) | added by the proxy, median (ms) |",
        "|---|---:|---:|---:|",
    ]
    for name, result in configs.items():
        latency = result["latency"]
        added = latency["round_trip_ms"] - plain["latency"]["round_trip_ms"]
        lines.append(f"| {name} | {latency['round_trip_ms']:.2f} | {latency['p90_ms']:.2f} | {added:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add(parser, "model")
    parser.add_argument("--sessions", default="2,4", help="concurrent sessions per throughput run")
    parser.add_argument("--chunks", type=int, default=6, help="chunks per session")
    parser.add_argument("--rounds", type=int, default=3, help="times round the servers")
    parser.add_argument("--samples", type=int, default=20, help="control round trips per server and round")
    parser.add_argument("--out", default=str(RESULTS / "scale"), help="report path, without suffix")
    args = parser.parse_args()
    model = ["--model", args.model] if args.model else []
    report = {"argv": sys.argv[1:], "model": args.model or "the shipped default", "chunks": args.chunks,
              "rounds": args.rounds, "machine": bench.machine(torch.device("cpu"))}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch, serving(model) as plain, on_ray(model) as ray_urls:
        report["configs"] = measure({"plain server": plain, **ray_urls}, args, Path(scratch))
    report["load_average_after"] = bench.load_average()
    bench.save_report(Path(args.out), report, render)


if __name__ == "__main__":
    main()
