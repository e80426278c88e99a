"""`streamgen bench` end to end on the tiny preset: a table, valid JSON, a PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamgen import bench


def test_bench_runs_end_to_end_and_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--preset", "tiny", "--steps", "1,2", "--chunks", "3", "--warmup", "1", "--sessions", "1,2"]
    assert bench.main([*args, "--target-fps", "4", "--json", str(out), "--plot", str(png), "--device", "cpu"]) == 0

    report = json.loads(out.read_text())
    assert report["machine"]["torch"] and report["machine"]["cpu_cores"] >= 1
    assert [row["steps"] for row in report["budgets"]] == [1, 2]
    for row in report["budgets"]:
        assert row["time_to_first_frame_s"] > 0 and row["fps"] > 0 and row["peak_memory_mb"] > 0
        assert 0 <= row["deadline_miss_rate"] <= 1
        latency = row["latency_ms"]
        assert set(latency) == {"transformer", "cache", "decode", "encode", "total"}
        assert latency["total"]["p50"] <= latency["total"]["p95"] <= latency["total"]["p99"]
        assert [c["steps"] for c in row["chunks"]] == [row["steps"]] * 3
        # The figures are the chunks' own records, summarised: recomputed here from them.
        chunks, later = row["chunks"], row["chunks"][1:]
        assert [c["frames"] for c in chunks] == [1, 12, 12]  # the first latent frame decodes to one video frame
        assert row["time_to_first_frame_s"] == chunks[0]["ready"]
        assert row["fps"] == pytest.approx(24 / (chunks[-1]["ready"] - chunks[0]["ready"]))
        totals = [1000 * sum(c[stage] for stage in ("transformer", "cache", "decode", "encode")) for c in later]
        assert latency["total"]["p50"] == pytest.approx(float(np.median(totals)))
        assert latency["decode"]["p99"] == pytest.approx(1000 * float(np.percentile([c["decode"] for c in later], 99)))
    phases = report["adaptive"]["phases"]
    assert [p["sessions"] for p in phases] == [1, 2] and all(p["steps_min"] >= 1 for p in phases)
    assert len(phases[1]["fps_per_session"]) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps" in capsys.readouterr().out


def test_bench_needs_a_model_and_enough_chunks(tmp_path):
    with pytest.raises(ValueError, match="chunks"):
        bench.main(["--preset", "tiny", "--chunks", "2", "--device", "cpu"])
    with pytest.raises(SystemExit):  # argparse: --model and --preset exclude each other
        bench.main(["--preset", "tiny", "--model", str(tmp_path)])


def test_delivery_figures_on_a_known_stream():
    """Three 12-frame chunks after the first at 16 fps have 0.75 s each: one on time, one late, one early."""
    ready = [0.25, 1.0, 1.875, 2.375]  # gaps 0.75 (on time: not later than the deadline), 0.875 (late), 0.5
    chunks = [{"ready": t, "frames": 1 if i == 0 else 12, "transformer": 0.25} for i, t in enumerate(ready)]
    got = bench.delivery(chunks, fps=16)
    assert got["fps"] == pytest.approx(36 / 2.125)
    assert got["realtime_ratio"] == pytest.approx(36 / 2.125 / 16)
    assert got["deadline_miss_rate"] == pytest.approx(1 / 3)
    assert got["transformer_fps"] == pytest.approx(36 / 0.75)
    assert bench.percentiles([0.1, 0.2, 0.3]) == pytest.approx({"p50": 200.0, "p95": 290.0, "p99": 298.0})
    with pytest.raises(ValueError, match="two chunks"):
        bench.delivery(chunks[:1], fps=16)


@pytest.mark.parametrize("name", ["quality-guidance2.5", "quality-guidance2.5.md"])
def test_reports_whose_names_differ_after_a_dot_do_not_overwrite_each_other(tmp_path, name):
    bench.save_report(tmp_path / name, {"guidance": 2.5}, lambda r: f"guidance {r['guidance']}\n")
    bench.save_report(tmp_path / "quality-guidance2.0", {"guidance": 2.0}, lambda r: f"guidance {r['guidance']}\n")
    assert json.loads((tmp_path / "quality-guidance2.5.json").read_text()) == {"guidance": 2.5}
    assert (tmp_path / "quality-guidance2.5.md").read_text() == "guidance 2.5\n"
    assert (tmp_path / "quality-guidance2.0.md").read_text() == "guidance 2.0\n"
    assert len(list(tmp_path.iterdir())) == 4
