"""`streamgen-client`'s failure paths: each ends with a one-line reason and exit status 1, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from streamgen_client import cli
from streamgen_client.client import endpoint
from streamgen_server.app import serve_in_thread

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_torch_thread")]


def test_endpoint_adds_the_websocket_path_and_token() -> None:
    assert endpoint("ws://h:1") == endpoint("ws://h:1/") == "ws://h:1/ws"
    assert endpoint("wss://h/live?x=1", "a b") == "wss://h/live?x=1&token=a+b"


def test_failures_are_reported_in_one_line(pipe, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    out = str(tmp_path / "out.mp4")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert cli.main(["--url", f"ws://127.0.0.1:{closed}", "--prompt", "x", "-o", out]) == 1
    assert "streamgen-client: error:" in capsys.readouterr().err

    with serve_in_thread(pipe, token="s3cret") as server:
        url = server.websocket_url
        assert cli.main(["--url", url, "--prompt", "x", "--token", "wrong", "-o", out]) == 1
        assert '"code":"unauthorized"' in capsys.readouterr().err
        assert cli.main(["--url", url, "--prompt", "x", "--token", "s3cret", "--steps", "0", "-o", out]) == 1
        assert "out_of_range: steps must be" in capsys.readouterr().err
        missing = str(tmp_path / "missing.mp4")
        assert cli.main(["--url", url, "--prompt", "x", "--token", "s3cret", "--video", missing, "-o", out]) == 1
        assert "No such file" in capsys.readouterr().err
    assert not Path(out).exists() and not Path(out + ".part").exists()
