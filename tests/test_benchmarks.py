"""Every benchmark script runs end to end on a tiny model. The README's figures come from these scripts, and nothing
else runs them: a script that an API change broke must fail here, not on the next person who measures with it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamgen import StreamConfig, StreamingPipeline, presets
from test_browser import chromium  # noqa: F401 - a fixture (Debian's Chromium, for interaction.py)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PROMPT = "a large red circle moving right quickly on a black background"

# Script -> its arguments and what it writes, with {model} (a tiny model, 64x64 streams), {run} (a tiny training
# run, its export in {run}/model) and {out} (a scratch directory); each asks for as little work as the script allows.
SCRIPTS = {
    "batching.py": ("--model {model} --sessions 1,2 --steps 1 --rounds 1 --out {out}/r", ["r.md", "r.json"]),
    "chunk_cost.py": ("--preset tiny --steps 1 --chunks 2 --repeats 1 --out {out}/r", ["r.md", "r.json"]),
    "continuation.py": ("--model {run}/model --prompts 2 --chunks 2 --steps 1 --out {out}/r", ["r.md", "r.json"]),
    "direction.py": ("--run {run} --model student --prompts 6 --out {out}/r", ["r.md", "r.json"]),
    "extension_sheet.py": ("--model {model} --chunks 1 --sheet {out}/r.png --out {out}/r.json", ["r.png", "r.json"]),
    "footage.py": ("--model {run}/model --steps 1 --out {out}/r --sheet {out}/r.png", ["r.md", "r.json", "r.png"]),
    "interaction.py": (
        "--model {model} --sessions 1 --rounds 1 --changes 2 --steps 2 --configs webcodecs+measured --out {out}/r",
        ["r.md", "r.json"],
    ),
    "memorisation.py": (
        "--run {run} --prompts 1 --checkpoints 1 --samples 1 --sampling-steps 1 --out {out}/r", ["r.md", "r.json"]
    ),
    "quality.py": ("--run {run} --prompts 1 --drift 2 --out {out}/r", ["r.md", "r.json"]),
    "robustness.py": ("--model {model} --out {out}/r", ["r.md", "r.json"]),
    "scale.py": ("--model {model} --sessions 2 --chunks 1 --rounds 1 --samples 2 --out {out}/r", ["r.md", "r.json"]),
    "server_overhead.py": ("--model {model} --chunks 3 --out {out}/r", ["r.md", "r.json"]),
    "serving.py": (
        "--model {model} --sessions 1 --chunks 3 --auto-chunks 3 --repeats 1 --out {out}/r", ["r.md", "r.json"]
    ),
    "steps_latency.py": ("--model {model} --steps 1,2 --chunks 2 --warmup 0 --out {out}/r", ["r.md", "r.json"]),
    "strip.py": (f"--model {{run}}/model --steps 1 --out {{out}}/r.png --prompt '{PROMPT}'", ["r.png"]),
    "vae_ceiling.py": ("--vae tiny={run}/model/vae --prompts 1 --out {out}/r", ["r.md", "r.json"]),
}
MARKS = {"scale.py": [pytest.mark.ray]}
FIXTURES = {"interaction.py": "chromium"}  # what a script needs beyond Python (installed by the fixture, else a skip)


def run_script(name: str, argv: list[str]) -> subprocess.CompletedProcess:
    """A benchmark script run as people run it (its own process, one thread)."""
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *argv], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with 64x64 streams as its stream defaults, which every script then uses."""
    directory = tmp_path_factory.mktemp("tiny-model")
    StreamingPipeline(**presets.build("tiny"), config=StreamConfig(height=64, width=64)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", [pytest.param(name, marks=MARKS.get(name, [])) for name in sorted(SCRIPTS)])
def test_the_script_runs_and_writes_its_report(
    name: str, tiny_model: Path, tiny_run, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if name in FIXTURES:
        request.getfixturevalue(FIXTURES[name])
    arguments, writes = SCRIPTS[name]
    done = run_script(name, shlex.split(arguments.format(model=tiny_model, run=tiny_run.root, out=tmp_path)))
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    for written in writes:
        assert (tmp_path / written).stat().st_size > 0, f"{name} did not write {written}"


def test_quality_scores_an_exported_model(tiny_run, tmp_path: Path) -> None:
    """The shipped model's figures need no training run: an exported model gives the teacher and stage-1 rows."""
    argv = ["--run", str(tiny_run.root / "model"), "--prompts", "1", "--drift", "0", "--out", str(tmp_path / "r")]
    done = run_script("quality.py", argv)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {row["model"] for row in rows} == {"teacher-euler", "anyflow (stage 1)"}
    assert all(np.isfinite(row["psnr"]) and 0 <= row["semantic"] <= 1 for row in rows)


def test_every_script_is_run_here() -> None:
    assert {path.name for path in BENCHMARKS.glob("*.py")} == set(SCRIPTS)
