"""`streamgen bench`: what a viewer of a stream gets, per step budget, on this machine.

For each budget: time to first frame, per-chunk latency (p50/p95/p99) split into transformer, cache update,
VAE decode and H.264 encode, sustained fps against the model's real-time rate, the deadline-miss rate (a chunk
of F frames must be ready within F / fps seconds of the previous one) and peak memory. Then the adaptive budget
(`streamgen.budget`) under 1, 2 and 4 sessions sharing the model in batched turns of the chunk runner
(`streamgen.runtime`), as the server runs them.
Warm-up (first calls, `torch.compile`) is run on a separate session and excluded. Results go to the terminal as
a table, to JSON with a description of the machine, and to a PNG plot (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import AnyFlowFARPipeline

from . import options, presets
from .config import StreamConfig
from .engine import attention
from .pipeline import STAGES, StreamingPipeline
from .runtime import AUTO, MediaChunk, Runner, Stream

PROMPT = "a red fox running through fresh snow, cinematic"
PERCENTILES = (50, 95, 99)


# -- model and machine ---------------------------------------------------------------------------------------
def from_preset(name: str, device: str | torch.device | None = None, **stream) -> StreamingPipeline:
    """A preset's random components, loaded as `from_pretrained` loads a checkpoint: on `device`, in its dtype,
    with the modules diffusers keeps in float32 (timestep embedder, norms, modulation tables) in float32."""
    p = presets.PRESETS[name]
    with tempfile.TemporaryDirectory() as directory:
        AnyFlowFARPipeline(**presets.build(name)).save_pretrained(directory)
        pipe = StreamingPipeline.from_pretrained(directory, device=device)
    pipe.config = StreamConfig(height=p.height, width=p.width, **stream)
    return pipe


def load(model: str | None, preset: str | None, device: str | None) -> tuple[StreamingPipeline, str]:
    """The pipeline to measure and how to name it: a directory, a preset, or the shipped default model."""
    if model and preset:
        raise ValueError("give --model or --preset, not both")
    if preset:
        return from_preset(preset, device), f"preset:{preset}"
    return StreamingPipeline.load(model, device), str(model) if model else "default"


def machine(device: torch.device) -> dict:
    """What the figures were measured on: they mean little without it (and, on a shared CPU, its load)."""
    import diffusers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    info["attention"] = "flash-attn" if attention.flash_attn_func is not None and device.type == "cuda" else "sdpa"
    return info


def describe(pipe: StreamingPipeline, source: str) -> dict:
    """The model and stream the figures are for."""
    config = pipe.config
    return {
        "source": source,
        "weights": "random" if source.startswith("preset:") else "trained",
        "transformer_parameters_m": sum(p.numel() for p in pipe.transformer.parameters()) / 1e6,
        "dtype": str(pipe.engine.dtype).removeprefix("torch."),
        "height": config.height,
        "width": config.width,
        "fps": config.fps,
        "chunk_video_frames": config.chunk_frames * pipe.latent_scale[0],
        "window": config.window,
        "sink": config.sink,
    }


def save_report(out: Path, report: dict, render) -> None:
    """`out.json` for machines, `out.md` (from `render(report)`) for people; the markdown is printed too.

    `out` names both without a suffix, and may hold dots (`quality-guidance2.5`): only a trailing `.json` or `.md`
    is taken off, so two reports whose names differ after a dot never overwrite each other."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_name(stem.name + ".md").write_text(render(report))
    print(render(report))


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: on a shared machine, what else competed for it."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextmanager
def peak_memory(device: torch.device):
    """Peak memory while the block runs, in MiB: CUDA's max allocated on a GPU; on a CPU the process's resident
    high-water mark, reset first where Linux allows (`/proc/self/clear_refs`), else the lifetime maximum."""
    result = {"method": ""}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result |= {"mb": torch.cuda.max_memory_allocated(device) / 2**20, "method": "cuda max_memory_allocated"}
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
        result["method"] = "process RSS high-water (VmHWM, reset per measurement)"
    except OSError:
        result["method"] = "process RSS high-water (ru_maxrss, since process start)"
    yield result
    result["mb"] = _rss_peak_mb()


def _rss_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# -- one stream ----------------------------------------------------------------------------------------------
def record(chunk: MediaChunk, start: float) -> dict:
    """A chunk's timing record as JSON: its stages, and when (since its stream started) its frames were ready."""
    timing = {stage: getattr(chunk.timing, stage) for stage in STAGES}
    return {"steps": chunk.steps, "frames": chunk.frames, "batch": chunk.batch, **timing, "ready": chunk.ready - start}


def delivery(chunks: list[dict], fps: float) -> dict:
    """Rate and punctuality of a stream's chunks after its first (whose time is the time to first frame)."""
    if len(chunks) < 2:
        raise ValueError("rates need at least two chunks: the first one only gives the time to first frame")
    later = chunks[1:]
    gaps = np.diff([c["ready"] for c in chunks])
    frames = sum(c["frames"] for c in later)
    seconds = chunks[-1]["ready"] - chunks[0]["ready"]
    return {
        "fps": frames / seconds,
        "realtime_ratio": frames / seconds / fps,
        "deadline_miss_rate": float(np.mean([gap > c["frames"] / fps for gap, c in zip(gaps, later)])),
        "transformer_fps": frames / sum(c["transformer"] for c in later),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) * 1000 for q in PERCENTILES}


def measure_budget(runner: Runner, steps: int, chunks: int, warmup: int) -> dict:
    """One budget: a warm-up stream, then a fresh one (new prompt: its encoding is part of the first frame)."""
    warm = Stream(PROMPT, seed=0, steps=steps)
    runner.open(warm)
    for _ in range(warmup):
        runner.turn([warm])
    runner.release(warm)
    device = runner.pipe.device
    with peak_memory(device) as memory:
        start = time.perf_counter()
        stream = Stream(f"{PROMPT}, take {steps}", seed=0, steps=steps)
        runner.open(stream)
        rows = [record(runner.turn([stream])[0], start) for _ in range(chunks)]
        runner.release(stream)
    later = rows[1:]
    return {
        "steps": steps,
        "time_to_first_frame_s": rows[0]["ready"],
        "latency_ms": {name: percentiles([sum(c[s] for s in STAGES) if name == "total" else c[name] for c in later])
                       for name in (*STAGES, "total")},  # fmt: skip
        **delivery(rows, runner.pipe.config.fps),
        "peak_memory_mb": memory["mb"],
        "memory_method": memory["method"],
        "chunks": rows,
    }


# -- adaptive budget under load ------------------------------------------------------------------------------
def measure_adaptive(runner: Runner, counts: list[int], rounds: int, target_fps: float) -> dict:
    """Streams join one phase at a time (e.g. 1, then 2, then 4); each round is one turn of the runner, every
    stream's chunk in one batched denoise (as the server runs them), and each stream's controller chooses its
    steps. Per phase: how well each stream holds `target_fps`, excluding the phase's first round (the joiners'
    first chunks, and the round in which the others learn of them)."""
    streams: list[Stream] = []
    rows: dict[int, list[dict]] = {}
    trace, phases = [], []
    start = time.perf_counter()
    for count in counts:
        while len(streams) < count:
            stream = Stream(f"{PROMPT}, viewer {len(streams) + 1}", seed=0, steps=AUTO, target_fps=target_fps)
            runner.open(stream)
            streams.append(stream)
            rows[id(stream)] = []
        first = {id(s): len(rows[id(s)]) for s in streams}  # each stream's first chunk of this phase
        for round_ in range(rounds):
            for index, (stream, chunk) in enumerate(zip(streams, runner.turn(streams))):
                rows[id(stream)].append(record(chunk, start))
                trace.append({"phase_sessions": count, "round": round_, "session": index, **rows[id(stream)][-1]})
        settled = [rows[id(s)][first[id(s)] + 1 :] for s in streams]
        per_session = [delivery(chunks, target_fps) for chunks in settled]
        steps = [c["steps"] for chunks in settled for c in chunks[1:]]
        phases.append(
            {
                "sessions": count,
                "fps_per_session": [d["fps"] for d in per_session],
                "deadline_miss_rate": float(np.mean([d["deadline_miss_rate"] for d in per_session])),
                "steps_mean": float(np.mean(steps)),
                "steps_min": min(steps),
                "steps_max": max(steps),
            }
        )
    for stream in streams:
        runner.release(stream)
    return {"target_fps": target_fps, "rounds_per_phase": rounds, "phases": phases, "trace": trace}


# -- report --------------------------------------------------------------------------------------------------
def table(report: dict) -> str:
    model, rows = report["model"], report["budgets"]
    lines = [
        f"{model['source']}: {model['width']}x{model['height']} at {model['fps']} fps, {model['dtype']} on "
        f"{report['machine']['device']} ({report['machine'].get('gpu') or report['machine']['cpu']})",
        "chunk latency in ms, p50 (p95/p99 for the total); first frame in s",
        f"{'steps':>5} {'first':>6} {'transf':>7} {'cache':>7} {'decode':>7} {'encode':>7} {'total p50/p95/p99':>20}"
        f" {'fps':>6} {'x real':>6} {'miss':>5} {'peak MiB':>9}",
    ]
    for r in rows:
        lat = r["latency_ms"]
        total = "/".join(f"{lat['total'][f'p{q}']:.0f}" for q in PERCENTILES)
        lines.append(
            f"{r['steps']:>5} {r['time_to_first_frame_s']:>6.2f} "
            + " ".join(f"{lat[name]['p50']:>7.1f}" for name in STAGES)
            + f" {total:>20} {r['fps']:>6.1f} {r['realtime_ratio']:>6.2f} {r['deadline_miss_rate']:>5.0%}"
            f" {r['peak_memory_mb']:>9.0f}"
        )
    if "adaptive" in report:
        adaptive = report["adaptive"]
        lines += ["", f"adaptive budget, target {adaptive['target_fps']:g} fps per session (batched turns)"]
        lines.append(f"{'sessions':>8} {'fps per session':>22} {'miss':>5} {'steps mean (min-max)':>21}")
        for p in adaptive["phases"]:
            fps = ", ".join(f"{x:.1f}" for x in p["fps_per_session"])
            steps = f"{p['steps_mean']:.1f} ({p['steps_min']}-{p['steps_max']})"
            lines.append(f"{p['sessions']:>8} {fps:>22} {p['deadline_miss_rate']:>5.0%} {steps:>21}")
    return "\n".join(lines)


def markdown(report: dict, argv: list[str]) -> str:
    """The terminal table with the command and machine it came from."""
    m = report["machine"]
    machine_line = ", ".join(f"{k} {v}" for k, v in m.items())
    return (
        f"# streamgen bench\n\n`python -m streamgen.bench {' '.join(argv)}` ({report['settings']['seconds']:.0f} s)\n\n"
        f"Machine: {machine_line}.\n\n```\n{table(report)}\n```\n"
    )


def plot(report: dict, path: str | Path) -> None:
    """Latency split and rate against steps; with the adaptive run, the steps it chose as sessions joined."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'streamgen[bench]'") from e
    rows, model = report["budgets"], report["model"]
    adaptive = report.get("adaptive")
    fig, axes = plt.subplots(1, 3 if adaptive else 2, figsize=(16 if adaptive else 11, 4.6))
    labels = [f"{r['steps']}\nfirst frame\n{r['time_to_first_frame_s']:.2f} s" for r in rows]
    x = np.arange(len(rows))
    deadline = 1000 * model["chunk_video_frames"] / model["fps"]

    ax = axes[0]
    bottom = np.zeros(len(rows))
    for name, color in zip(STAGES, ("#4C72B0", "#55A868", "#C44E52", "#8172B2")):
        values = np.array([r["latency_ms"][name]["p50"] for r in rows])
        ax.bar(x, values, bottom=bottom, color=color, label=name)
        bottom += values
    p95 = [r["latency_ms"]["total"]["p95"] for r in rows]
    ax.plot(x, p95, "k_", markersize=18, mew=2, label="total p95")
    ax.axhline(deadline, color="k", ls="--", lw=1)
    ax.annotate(f"real-time deadline {deadline:.0f} ms", (x[-1] + 0.4, deadline), ha="right", va="bottom", fontsize=8)
    ax.set(xticks=x, xticklabels=labels, xlabel="steps per chunk", ylabel="ms per chunk (p50, stacked)")
    ax.set_title(f"chunk latency ({model['chunk_video_frames']} frames per chunk)")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1]
    ax.plot(x, [r["fps"] for r in rows], "o-", label="end to end (delivered)")
    ax.plot(x, [r["transformer_fps"] for r in rows], "s--", alpha=0.7, label="transformer only")
    ax.axhline(model["fps"], color="k", ls="--", lw=1)
    ax.annotate(f"real time {model['fps']} fps", (x[0], model["fps"]), va="bottom", fontsize=8)
    ax.set(xticks=x, xticklabels=labels, xlabel="steps per chunk", ylabel="frames per second", yscale="log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title("sustained rate")
    ax.legend(fontsize=8)

    if adaptive:
        ax = axes[2]
        trace = adaptive["trace"]
        starts = {}
        for i, t in enumerate(trace):
            starts.setdefault(t["phase_sessions"], i)
        for session in sorted({t["session"] for t in trace}):
            points = [(i, t["steps"]) for i, t in enumerate(trace) if t["session"] == session]
            ax.step(*zip(*points), where="post", label=f"session {session + 1}")
        misses = [i for i, missed in enumerate(_missed(trace, adaptive["target_fps"])) if missed]
        ax.plot(misses, [0.8] * len(misses), "rx", label="deadline missed")
        ax.set_ylim(0.6, 2 * max(t["steps"] for t in trace))
        for count, start in starts.items():
            ax.axvline(start, color="grey", lw=0.8)
            ax.annotate(f"{count} session{'s' * (count > 1)}", (start, ax.get_ylim()[1]), va="top", fontsize=8)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set(xlabel="chunk (all sessions, turn by turn)", ylabel="steps chosen")
        ax.set_title(f"adaptive budget at {adaptive['target_fps']:g} fps per session")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"{model['source']} at {model['width']}x{model['height']}, {report['machine']['device']}"
        f" ({report['machine'].get('gpu') or report['machine']['cpu']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _missed(trace: list[dict], fps: float) -> list[bool]:
    """Per trace entry: was that chunk later than its deadline after the same session's previous one?"""
    last: dict[int, float] = {}
    missed = []
    for t in trace:
        previous = last.get(t["session"])
        missed.append(previous is not None and t["ready"] - previous > t["frames"] / fps)
        last[t["session"]] = t["ready"]
    return missed


# -- command line --------------------------------------------------------------------------------------------
def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamgen bench", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    options.add(source, "model")
    source.add_argument("--preset", choices=sorted(presets.PRESETS), help="random weights of a preset's shape")
    p.add_argument("--height", type=int, help="video height (default: the model's)")
    p.add_argument("--width", type=int, help="video width (default: the model's)")
    p.add_argument("--steps", type=parse_ints, default=[1, 2, 4, 8, 16], help="budgets, comma separated")
    p.add_argument("--chunks", type=int, default=6, help="measured chunks per budget, the first one included")
    p.add_argument("--warmup", type=int, default=2, help="chunks of a separate session before measuring")
    p.add_argument("--sessions", type=parse_ints, default=[1, 2, 4], help="adaptive run: session counts ('' to skip)")
    p.add_argument("--target-fps", type=float, help="adaptive run's target per session (default: the model's fps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--markdown", help="write the table and the machine here, as Markdown")
    options.add(p, "device", "threads")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.chunks < 3:
        raise ValueError("--chunks must be at least 3: the first chunk gives the time to first frame, later ones rates")
    options.apply_threads(args)
    pipe, source = load(args.model, args.preset, args.device)
    changes = {k: v for k, v in (("height", args.height), ("width", args.width)) if v}
    pipe.config = pipe.config.replace(**changes)
    if args.compile:
        pipe.engine.compile()
    report = {
        "machine": machine(pipe.device),
        "model": describe(pipe, source),
        "settings": {"chunks": args.chunks, "warmup": args.warmup, "compile": args.compile},
        "budgets": [],
    }
    runner = Runner(pipe)
    started = time.perf_counter()
    for steps in args.steps:
        report["budgets"].append(measure_budget(runner, steps, args.chunks, args.warmup))
    if args.sessions:
        report["adaptive"] = measure_adaptive(runner, args.sessions, args.chunks, args.target_fps or pipe.config.fps)
    report["settings"]["seconds"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = load_average()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise RuntimeError("--plot needs matplotlib: pip install 'streamgen[bench]'") from None
    report = run(args)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)
    if args.markdown:
        Path(args.markdown).write_text(markdown(report, argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
