"""What a person feels: control-to-screen latency of the live page, in a real headless Chromium on a real server.

Each page is the shipped web player (`clients/web/`), driven from inside the page so that every time is read on
the page's own clock. Per session: Start is pressed `--starts` times (first-frame latency: press -> first
frame displayed), then `--changes` controls are sent at random moments of the chunk cycle, alternately a new
prompt and a new step count. Per change: *arrive* = send -> the first media of the first chunk made under the
change reaches the page; *display* = send -> the page displays that chunk's first frame (the page reports each
displayed frame's number: `player.displayed`). With n sessions, n pages run at once, one session each.

    OMP_NUM_THREADS=1 python benchmarks/interaction.py [--sessions 1,4] [--changes 12] [--label before]

Needs Playwright (Python package) and Debian's Chromium at /usr/bin/chromium (never `playwright install`).
Results: benchmarks/results/interaction_<label>.json, and the table printed (benchmarks/results/interaction.md
holds the before/after comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

import torch
from playwright.async_api import async_playwright

from streamgen import bench
from streamgen_server.app import serve_in_thread

RESULTS = Path(__file__).parent / "results"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"]

# Runs in the page: records when media and stats arrive, then drives starts and changes; returns raw timings.
DRIVE = """async ({starts, changes, steps, session}) => {
  const player = window.streamgen, now = () => performance.now();
  const segments = new Map();  // chunk index -> {t, first_frame}: when its media began to arrive
  const chunks = [];  // `chunk` stats messages, with arrival time
  const hook = (ws) => ws.addEventListener("message", (e) => {
    if (typeof e.data !== "string") return;
    const msg = JSON.parse(e.data);
    if (msg.type === "segment" && msg.kind === "chunk") segments.set(msg.chunk, {t: now(), first: msg.first_frame});
    if (msg.type === "started") segments.clear();
    if (msg.type === "chunk") chunks.push({...msg, t: now()});
  });
  const until = (test, ms = 60000) => new Promise((resolve, reject) => {
    const begun = now();
    const poll = () => {
      const value = test();
      if (value !== undefined && value !== null && value !== false) return resolve(value);
      if (now() - begun > ms) return reject(new Error("timed out waiting in the page"));
      setTimeout(poll, 5);
    };
    poll();
  });
  const shown = (frame, after) => player.displayed.find(([t, f]) => t > after && f >= frame);
  await until(() => player.state === "idle");
  hook(player.ws);
  const result = {starts: [], changes: []};
  for (let i = 0; i < starts; i++) {
    player.displayed.length = 0;
    const t0 = now();
    document.getElementById("start").click();
    const first = await until(() => segments.get(0));
    const display = await until(() => shown(0, t0));
    result.starts.push({arrive_ms: first.t - t0, display_ms: display[0] - t0});
    if (i < starts - 1) {
      document.getElementById("stop").click();
      await until(() => player.state === "idle");
    }
  }
  let current = steps;
  for (let k = 0; k < changes; k++) {
    await new Promise((r) => setTimeout(r, 400 + 1000 * Math.random()));  // a random phase of the chunk cycle
    const kind = k % 2 ? "steps" : "prompt";
    const prompt = `session ${session}, change ${k}: a paper boat on a rainy street`;
    if (kind === "steps") current = current === steps ? Math.floor(steps / 2) : steps;
    const t0 = now();
    player.ws.send(JSON.stringify(kind === "steps" ? {type: "steps", steps: current} : {type: "prompt", prompt}));
    const chunk = await until(() => chunks.find((c) => c.t > t0 && (kind === "steps" ? c.steps === current
                                                                                       : c.prompt === prompt)));
    const media = segments.get(chunk.chunk);
    const display = await until(() => shown(media.first, t0));
    result.changes.push({kind, chunk: chunk.chunk, arrive_ms: media.t - t0, display_ms: display[0] - t0,
                         chunk_ms: chunk.latency_ms.total});
    player.displayed.splice(0, player.displayed.length - 64);  // keep the log short
  }
  document.getElementById("stop").click();
  return result;
}"""

def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return {"median": statistics.median(values), "p95": p95, "n": len(values)}


async def run_sessions(url: str, count: int, args: argparse.Namespace) -> dict:
    """`count` pages at once, each with its own session; their timings pooled."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = []
            for i in range(count):
                page = await browser.new_page()
                await page.goto(f"{url}?prompt=session%20{i}%3A%20a%20red%20fox&steps={args.steps}{args.query}")
                await page.wait_for_function("() => window.streamgen?.state === 'idle'", timeout=60_000)
                pages.append(page)
            options = {"starts": args.starts, "changes": args.changes, "steps": args.steps}
            runs = await asyncio.gather(
                *(page.evaluate(DRIVE, options | {"session": i}) for i, page in enumerate(pages))
            )
        finally:
            await browser.close()
    starts = [s for run in runs for s in run["starts"]]
    changes = [c for run in runs for c in run["changes"]]
    return {
        "sessions": count,
        "first_frame_ms": summary([s["display_ms"] for s in starts]),
        "first_media_ms": summary([s["arrive_ms"] for s in starts]),
        "change_arrive_ms": summary([c["arrive_ms"] for c in changes]),
        "change_display_ms": summary([c["display_ms"] for c in changes]),
        "chunk_ms": summary([c["chunk_ms"] for c in changes]),
        "raw": runs,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Interaction latency ({report['label']}): `python benchmarks/interaction.py {report['arguments']}`; "
        f"{report['model']['source']} model at {report['model']['width']}x{report['model']['height']}, "
        f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch thread(s), load average "
        f"{m['load_average'][0]} at the start and {m['load_average_end'][0]} at the end.",
        "",
        "| sessions | first frame from Start | change -> chunk arrives | change -> displayed | chunk generation |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        cells = [row[key] for key in ("first_frame_ms", "change_arrive_ms", "change_display_ms", "chunk_ms")]
        lines.append(
            f"| {row['sessions']} | "
            + " | ".join(f"{c['median']:.0f} / {c['p95']:.0f} ms (n={c['n']})" for c in cells)
            + " |"
        )
    lines += ["", "Each cell: median / p95 in ms over n starts or changes; chunk generation as the server timed it."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--sessions", default="1,4")
    p.add_argument("--changes", type=int, default=12, help="control changes per session")
    p.add_argument("--starts", type=int, default=3, help="Start presses per session (first-frame latency)")
    p.add_argument("--steps", type=int, default=4, help="steps at Start; changes alternate it with half of it")
    p.add_argument("--query", default="", help="extra page URL parameters, e.g. '&player=mse'")
    p.add_argument("--label", default="run", help="names the result file: interaction_<label>.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe, source = bench.load(args.model, None, "cpu")
    counts = bench.parse_ints(args.sessions)
    report = {
        "label": args.label,
        "arguments": " ".join(f"--{k} {v}" for k, v in vars(args).items() if v not in (None, "")),
        "machine": bench.machine(pipe.device),
        "model": bench.describe(pipe, source),
    }
    with serve_in_thread(pipe, max_sessions=max(counts)) as server:
        report["rows"] = [asyncio.run(run_sessions(server.url, count, args)) for count in counts]
    report["machine"]["load_average_end"] = bench.load_average()
    bench.save_report(RESULTS / f"interaction_{args.label}", report, markdown)


if __name__ == "__main__":
    main()
