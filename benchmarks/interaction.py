"""What a person feels: control-to-screen latency of the live page, in a real headless Chromium on a real server.

Each page is the shipped web player (`server/streamgen_server/web/`), driven from inside the page so that every
time is read on the page's own clock. Per page session: Start is pressed (first-frame latency: press -> first frame
displayed), then controls are sent at random moments of the chunk cycle, alternately a new prompt and a new step
count. Per change: *arrive* = send -> the first media of the first chunk made under the change reaches the page;
*display* = send -> the page displays that chunk's first frame (the page reports each displayed frame's number:
`player.displayed`). With n sessions, n pages run at once, one session each.

The configurations, player + pacing [+ variant], are measured in one run, interleaved round by round so that they
share the machine's load (a shared CPU's load moves by the minute), after one round not measured: the page's
WebCodecs player or its MSE fallback (`player=mse`); the pacing lead measured per stream (`ServedStream.lead`) or
the constant one second it replaced (the lead pinned to PACE_LEAD_SECONDS for those rounds); and the server as it
is, or with one of its latency cuts undone for those rounds: "whole-chunks", each chunk decoded, encoded and sent
whole instead of a latent frame (4 frames) at a time (`ServedStream.split` off); "early-turns", a turn denoised as
soon as its streams are due, up to a turn ahead of the encoder, instead of no sooner than the encoder can take its
chunks (`Scheduler._encoder_backlog` not waited for); "no-remake", a change that arrives while a chunk is denoised
waits for the next chunk instead of having that chunk made again (`Runner.remake` off; the table counts the chunks
made again); "batch-all", every ready viewer shares a turn however long its decoding then queues (no
`Scheduler._viewers_per_turn` limit); or, instead of batching, "one-at-a-time", each turn one stream's chunk
(`Scheduler.max_batch` 1, the scheduler before batching). "webcodecs+measured" is what the page and server do now;
"mse+fixed" is the pacing before issue 14 with today's MSE fallback, which like the WebCodecs player catches up with
the live edge after a stall (the page before issue 14 did not: its own run, on its commit, is
`interaction_before.json`). The server overlaps decoding with denoising as `streamgen serve` does (`--no-overlap`:
as `streamgen serve --no-overlap`).

Of the changes that miss the next chunk, the table counts those that came while a chunk they missed was denoised
and committed but not yet being decoded (*waiting*: the server's own clock, `Timeline`): with a remake rule extended
to chunks whose decode has not started, these would show a chunk earlier.

    OMP_NUM_THREADS=1 python benchmarks/interaction.py [--sessions 1,4] [--rounds 3] [--changes 4]

Older code is measured with this script by putting that code first on the path, e.g. for commit c54ab6b:
`git archive c54ab6b | tar -x -C /tmp/c54ab6b` and `PYTHONPATH=/tmp/c54ab6b:/tmp/c54ab6b/server python
benchmarks/interaction.py --out benchmarks/results/interaction_c54ab6b`.

Needs Playwright (Python package) and Debian's Chromium at /usr/bin/chromium (never `playwright install`).
Results: benchmarks/results/interaction.json and interaction.md, with the runs of older code in REFERENCES.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import torch
from playwright.async_api import async_playwright

from streamgen import bench
from streamgen.runtime import Stream
from streamgen_server.app import serve_in_thread
from streamgen_server.scheduler import PACE_LEAD_SECONDS, ServedStream

RESULTS = Path(__file__).parent / "results"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"]
PLAYERS = {"webcodecs": "", "mse": "&player=mse"}  # page URL parameters
LEADS = ("measured", "fixed")
VARIANTS = ("whole-chunks", "early-turns", "no-remake", "batch-all", "one-at-a-time")  # a cut undone (see above)
CONFIGS = [f"{player}+{lead}" for player, lead in itertools.product(PLAYERS, LEADS)]
CONFIGS[1:1] = [f"webcodecs+measured+{variant}" for variant in VARIANTS]
# How the variants take turns; else "as served".
BATCHING = {"batch-all": "all ready", "one-at-a-time": "one at a time", "early-turns": "as soon as due"}
# Runs of older code kept in results/, shown under this run's table: file -> which code ran.
REFERENCES = {
    "interaction_79c33d1.json": "the code before sub-chunk sending and its turn timing (commit 79c33d1) on the model "
    "before the wider VAE decoder (a chunk's decode about 0.12 s), this script's previous run",
    "interaction_c54ab6b.json": "the code of issue 14 before its latency cuts (commit c54ab6b), with this script",
    "interaction_before.json": "the code before issue 14 (commit ad3127b), with that commit's script",
}

# Runs in the page: records when media and stats arrive, then drives starts and changes; returns raw timings.
DRIVE = """async ({starts, changes, steps, session}) => {
  const player = window.streamgen, now = () => performance.now();
  const segments = new Map();  // chunk index -> {t, first_frame}: when its media began to arrive
  const chunks = [];  // `chunk` stats messages, with arrival time
  const hook = (ws) => ws.addEventListener("message", (e) => {
    if (typeof e.data !== "string") return;
    const msg = JSON.parse(e.data);
    if (msg.type === "segment" && msg.kind === "chunk" && !segments.has(msg.chunk)) {  // its first piece
      segments.set(msg.chunk, {t: now(), first: msg.first_frame});
    }
    if (msg.type === "started") segments.clear();
    if (msg.type === "chunk") chunks.push({...msg, t: now()});
  });
  const until = (what, test, ms = 60000) => new Promise((resolve, reject) => {
    const begun = now();
    const poll = () => {
      const value = test();
      if (value !== undefined && value !== null && value !== false) return resolve(value);
      if (now() - begun > ms) return reject(new Error(`timed out waiting in the page for ${what}`));
      setTimeout(poll, 5);
    };
    poll();
  });
  const shown = (frame, after) => player.displayed.find(([t, f]) => t > after && f >= frame);
  await until("an idle player", () => player.state === "idle");
  hook(player.ws);
  const result = {starts: [], changes: []};
  for (let i = 0; i < starts; i++) {
    player.displayed.length = 0;
    const t0 = now();
    document.getElementById("start").click();
    const first = await until("the first chunk", () => segments.get(0));
    const display = await until("its first frame shown", () => shown(0, t0));
    result.starts.push({arrive_ms: first.t - t0, display_ms: display[0] - t0});
    if (i < starts - 1) {
      document.getElementById("stop").click();
      await until("an idle player after stop", () => player.state === "idle");
    }
  }
  let current = steps;
  for (let k = 0; k < changes; k++) {
    await new Promise((r) => setTimeout(r, 400 + 1000 * Math.random()));  // a random phase of the chunk cycle
    const kind = k % 2 ? "steps" : "prompt";
    const prompt = `session ${session}, change ${k}: a paper boat on a rainy street`;
    if (kind === "steps") current = current === steps ? Math.floor(steps / 2) : steps;
    const arrived = Math.max(-1, ...segments.keys());  // the latest chunk whose media reached the page
    const t0 = now();
    player.ws.send(JSON.stringify(kind === "steps" ? {type: "steps", steps: current} : {type: "prompt", prompt}));
    const chunk = await until("a chunk made under the change", () => chunks.find((c) => c.t > t0 && (kind === "steps" ? c.steps === current
                                                                                       : c.prompt === prompt)));
    const media = segments.get(chunk.chunk);
    const display = await until("that chunk shown", () => shown(media.first, t0));
    result.changes.push({kind, chunk: chunk.chunk, arrive_ms: media.t - t0, display_ms: display[0] - t0,
                         chunk_ms: chunk.latency_ms.total, stages_ms: chunk.latency_ms,
                         missed: chunk.chunk - arrived - 1});  // chunks made under the old setting after the send
    player.displayed.splice(0, player.displayed.length - 64);  // keep the log short
  }
  document.getElementById("stop").click();
  return result;
}"""

def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return {"median": statistics.median(values), "p95": p95, "n": len(values)}


@contextlib.contextmanager
def pacing(lead: str) -> Iterator[None]:
    """"measured": the server as it is; "fixed": every stream's lead pinned to PACE_LEAD_SECONDS, the constant
    lead before issue 14 (the cap of the measured one)."""
    measured = ServedStream.lead
    if lead == "fixed":
        ServedStream.lead = property(lambda stream: PACE_LEAD_SECONDS)
    try:
        yield
    finally:
        ServedStream.lead = measured


@contextlib.contextmanager
def undone(scheduler, variants: list[str]) -> Iterator[None]:
    """The server with the latency cuts named in `variants` (VARIANTS) undone until the block ends."""
    runner, max_batch, split = scheduler.runner, scheduler.max_batch, vars(ServedStream).get("split")
    runner.remake = "no-remake" not in variants
    if "whole-chunks" in variants:
        ServedStream.split = property(lambda stream: False)
    if "early-turns" in variants:
        scheduler._encoder_backlog = lambda now: 0.0
    if "batch-all" in variants:  # no limit on the viewers in a turn (as before it: c54ab6b)
        scheduler._viewers_per_turn = lambda: None
    if "one-at-a-time" in variants:
        scheduler.max_batch = 1
    try:
        yield
    finally:
        runner.remake, scheduler.max_batch = True, max_batch
        vars(scheduler).pop("_viewers_per_turn", None)
        vars(scheduler).pop("_encoder_backlog", None)
        if split is not None:  # code from before sub-chunk sending has none
            ServedStream.split = split


class Timeline:
    """The server's own clock, per stream (by its first prompt): when each control change reached it, and when each
    chunk was denoised and committed and when its decode began. Recorded over the runner and the streams."""

    def __init__(self) -> None:
        self.changes: dict[str, list[float]] = defaultdict(list)
        self.committed: dict[str, dict[int, float]] = defaultdict(dict)
        self.decoding: dict[str, dict[int, float]] = defaultdict(dict)

    @contextlib.contextmanager
    def recording(self, runner) -> Iterator[None]:
        denoise, deliver, changes = runner.denoise, runner.deliver, (Stream.set_prompt, Stream.set_budget)

        def noted(change):
            def noting(stream, *args, **kwargs) -> None:
                change(stream, *args, **kwargs)
                if hasattr(stream, "request"):  # not the budget a stream sets itself up with
                    self.changes[stream.request.prompt].append(time.perf_counter())

            return noting

        def denoising(streams):
            chunks = denoise(streams)
            for chunk in chunks:  # committed: its session's next chunk is the one after it
                self.committed[chunk.stream.request.prompt][chunk.stream.session.chunk_index - 1] = time.perf_counter()
            return chunks

        def delivering(chunk):
            self.decoding[chunk.stream.request.prompt][chunk.stream.chunks] = time.perf_counter()
            return deliver(chunk)

        runner.denoise, runner.deliver = denoising, delivering
        Stream.set_prompt, Stream.set_budget = map(noted, changes)
        try:
            yield
        finally:
            del runner.denoise, runner.deliver
            Stream.set_prompt, Stream.set_budget = changes

    def waits(self) -> list[float]:
        """Milliseconds each chunk waited, denoised and committed, for its decode to begin."""
        return [
            1000 * (self.decoding[prompt][n] - at)
            for prompt, committed in self.committed.items() for n, at in committed.items()
            if n in self.decoding[prompt]
        ]  # fmt: skip

    def waiting(self, prompt: str, index: int, change: dict) -> bool:
        """Whether the `index`-th change of the stream started with `prompt` came while a chunk it missed was
        committed but not yet being decoded."""
        at, missed = self.changes[prompt][index], range(change["chunk"] - change["missed"], change["chunk"])
        committed, decoding = self.committed[prompt], self.decoding[prompt]
        return any(committed.get(n, math.inf) <= at < decoding.get(n, math.inf) for n in missed)


def prompt(session: int) -> str:
    """The prompt a page starts its session with (the server's streams are told apart by it)."""
    return f"session {session}: a red fox"


async def run_pages(browser, url: str, count: int, query: str, args: argparse.Namespace, changes: int) -> list[dict]:
    """`count` pages at once, each with its own session: one Start, `changes` changes, Stop."""
    pages = []
    try:
        for i in range(count):
            page = await browser.new_page()
            await page.goto(f"{url}?prompt={quote(prompt(i))}&steps={args.steps}{query}")
            await page.wait_for_function("() => window.streamgen?.state === 'idle'", timeout=60_000)
            pages.append(page)
        options = {"starts": 1, "changes": changes, "steps": args.steps}
        return await asyncio.gather(*(page.evaluate(DRIVE, options | {"session": i}) for i, page in enumerate(pages)))
    finally:
        for page in pages:
            await page.close()


async def run_sessions(server, count: int, args: argparse.Namespace) -> list[dict]:
    """Every configuration with `count` sessions, `args.rounds` rounds of each, interleaved; timings pooled."""
    scheduler = server.app.scheduler
    runner = scheduler.runner
    runs: dict[str, list[dict]] = {config: [] for config in args.configs.split(",")}
    remade = dict.fromkeys(runs, 0)
    waits: dict[str, list[float]] = {config: [] for config in runs}
    counted = hasattr(runner, "remade")  # code from before the remake has no count
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:  # first a round not measured: a server's first sessions pay one-off costs (first calls of each shape)
            await run_pages(browser, server.url, count, "", args, changes=2)
            for _, config in itertools.product(range(args.rounds), runs):
                player, lead, *flags = config.split("+")
                before, timeline = getattr(runner, "remade", 0), Timeline()
                with pacing(lead), undone(scheduler, flags), timeline.recording(runner):
                    pages = await run_pages(browser, server.url, count, PLAYERS[player], args, args.changes)
                remade[config] += getattr(runner, "remade", 0) - before
                waits[config] += timeline.waits()
                for i, page in enumerate(pages):
                    for k, change in enumerate(page["changes"]):
                        change["waiting"] = change["missed"] > 0 and timeline.waiting(prompt(i), k, change)
                runs[config] += pages
        finally:
            await browser.close()
    rows = []
    for config, pages in runs.items():
        player, lead, *flags = config.split("+")
        starts = [s for run in pages for s in run["starts"]]
        changes = [c for run in pages for c in run["changes"]]
        rows.append({
            "sessions": count,
            "player": player,
            "lead": lead,
            "remake": "no-remake" not in flags,
            "split": "whole-chunks" not in flags,
            "batching": next((BATCHING[flag] for flag in flags if flag in BATCHING), "as served"),
            "remade": remade[config] if counted else None,
            "first_frame_ms": summary([s["display_ms"] for s in starts]),
            "first_media_ms": summary([s["arrive_ms"] for s in starts]),
            "change_arrive_ms": summary([c["arrive_ms"] for c in changes]),
            "change_display_ms": summary([c["display_ms"] for c in changes]),
            "chunk_ms": summary([c["chunk_ms"] for c in changes]),
            "decode_wait_ms": summary(waits[config]),
            "missed": sum(c["missed"] > 0 for c in changes),
            "waiting": sum(c["waiting"] for c in changes),
            "raw": pages,
        })  # fmt: skip
    return rows


def cells(row: dict, keys=("first_frame_ms", "change_arrive_ms", "change_display_ms", "chunk_ms")) -> str:
    """Median / p95 of each of `keys` ("-" where the row has none: runs of older code)."""
    return " | ".join(f"{row[key]['median']:.0f} / {row[key]['p95']:.0f}" if key in row else "-" for key in keys)


HEADER = [
    "| sessions | player | pacing lead | sent | remake | turns | first frame | change -> arrives | "
    "change -> displayed | chunk | wait for decode | missed (waiting) | n |",
    "|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
]


def line(row: dict) -> str:
    """A configuration's row; `remake`: chunks made again under a change, or "off" (or "-": code without it). Runs of
    code from before sub-chunk sending sent whole chunks and did not time the waiting."""
    remake = "off" if not row.get("remake", True) else "-" if row.get("remade") is None else row["remade"]
    sent = "by latent frame" if row.get("split") else "whole chunks"
    missed = f"{row['missed']}" + (f" ({row['waiting']})" if "waiting" in row else "")
    columns = [row["sessions"], row["player"], row["lead"], sent, remake, row["batching"], cells(row),
               cells(row, ["decode_wait_ms"]), missed]  # fmt: skip
    return "| " + " | ".join(map(str, [*columns, row["change_display_ms"]["n"]])) + " |"


def row_key(row: dict) -> tuple:
    """What a row's configuration is: player, pacing lead, split, remake, batching."""
    return row["player"], row["lead"], row.get("split", False), row["remake"], row["batching"]


def run_line(report: dict) -> str:
    """How a run was made: its command, model, machine and load."""
    m, model = report["machine"], report["model"]
    return (
        f"`python benchmarks/interaction.py {report['arguments']}`: {model['source']} model at "
        f"{model['width']}x{model['height']}, {m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch "
        f"thread, load average {m['load_average'][0]} at the start and {m['load_average_end'][0]} at the end"
    )


def markdown(report: dict) -> str:
    lines = [
        "# Control-to-screen latency: the live page in headless Chromium",
        "",
        f"{run_line(report)} (the CPU is shared with other work: compare rows of one run, which shared its load "
        "round by round).",
        "",
        "Per change of prompt or steps: *arrives* = sent -> the first media of the first chunk made under it "
        "reaches the page; *displayed* = sent -> the page displays that chunk's first frame. *First frame* = Start "
        "-> first frame displayed. *Chunk* = its generation as the server timed it. *Wait for decode*: how long "
        "each chunk, denoised and committed, waited for its decode to begin (the server's clock). *Remake* = chunks "
        "dropped and made again under a change that came while they were denoised (off: not made again). *Sent*: "
        "each chunk "
        "decoded, encoded and sent a latent frame (4 frames) at a time, or whole. *Turns*: the sessions' chunks "
        "share turns as the server batches and times them, all ready ones, one at a time, or as the server does but "
        "each turn denoised as soon as its streams are due (up to a turn ahead of the encoder) rather than no sooner "
        "than the encoder can take its chunks. "
        "*Missed*: changes that came while the next chunk was already past its denoising, so that it was made under "
        "the old setting and the change shows a chunk later; in brackets, those of them that came while a chunk they "
        "missed was denoised but its decode had not begun (a remake rule extended to such chunks would have shown "
        "them a chunk earlier). Median / p95 in ms; n = changes (starts: n / changes per session).",
        "",
        *HEADER,
    ]
    rows = [row for rows in report["rows"] for row in rows]
    lines += [line(row) for row in rows]
    lines += ["", "Issue 14's target, median change -> displayed under half a second plus one chunk's generation "
              "(WebCodecs player, measured lead, this run's median chunk time):"]
    for row in rows:
        if row_key(row) == ("webcodecs", "measured", True, True, "as served"):
            now, target = row["change_display_ms"]["median"], 500 + row["chunk_ms"]["median"]
            met = "met" if now < target else "not met"
            lines.append(f"- {row['sessions']} session(s): {now:.0f} ms against {target:.0f} ms: {met}")
    for name, code in REFERENCES.items():
        if not (RESULTS / name).is_file() or name == report.get("file"):
            continue
        old = json.loads((RESULTS / name).read_text())
        old_rows = [row for rows in old["rows"] for row in rows] if isinstance(old["rows"][0], list) else old["rows"]
        lines += ["", f"The same measure on {code} (`{name}`): {run_line(old)}.", ""]
        if "player" in old_rows[0]:
            lines += [*HEADER, *map(line, old_rows)]
        else:  # before issue 14: one player, one pacing
            lines += ["| sessions | first frame | change -> arrives | change -> displayed | chunk | n |",
                      "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            lines += [f"| {r['sessions']} | {cells(r)} | {r['change_display_ms']['n']} |" for r in old_rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--sessions", default="1,4")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every configuration, interleaved")
    p.add_argument("--changes", type=int, default=4, help="control changes per session and round")
    p.add_argument("--steps", type=int, default=4, help="steps at Start; changes alternate it with half of it")
    p.add_argument("--size", type=int, help="frame height and width (default: the model's; smaller keeps a loaded "
                   "machine real-time)")  # fmt: skip
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {','.join(CONFIGS)}")
    p.add_argument("--no-overlap", action="store_true", help="decode on the denoising thread (streamgen serve's "
                   "--no-overlap)")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "interaction")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2: the changes alternate it with half of it")
    if unknown := set(args.configs.split(",")) - set(CONFIGS):
        p.error(f"unknown configurations {sorted(unknown)}; choose from {CONFIGS}")
    torch.set_num_threads(1)
    pipe, source = bench.load(args.model, None, "cpu")
    if args.size:
        pipe.config = pipe.config.replace(height=args.size, width=args.size)
    counts = bench.parse_ints(args.sessions)
    report = {
        "arguments": " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items() if v not in (None, False) and k != "out"
        ),
        "file": args.out.with_suffix(".json").name,
        "machine": bench.machine(pipe.device),
        "model": bench.describe(pipe, source),
    }
    with serve_in_thread(pipe, max_sessions=max(counts), overlap=not args.no_overlap) as server:
        report["rows"] = [asyncio.run(run_sessions(server, count, args)) for count in counts]
    report["machine"]["load_average_end"] = bench.load_average()
    bench.save_report(args.out, report, markdown)


if __name__ == "__main__":
    main()
