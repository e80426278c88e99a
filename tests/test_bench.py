"""`streamgen bench` end to end on the tiny preset: a table, valid JSON, a PNG."""

from __future__ import annotations

import json

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
