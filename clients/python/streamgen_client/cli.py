"""`streamgen-client`: drive a live session from flags, record it to an MP4, print each chunk's latency."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from websockets.exceptions import InvalidStatus, WebSocketException

from .client import StreamClient, StreamError, record


def _show(message: dict[str, Any]) -> None:
    kind = message["type"]
    if kind == "chunk":
        latency = "  ".join(f"{stage} {ms:6.1f}" for stage, ms in message["latency_ms"].items())
        print(f"chunk {message['chunk']:4d}: {message['frames']:3d} frames, {message['steps']:2d} steps | {latency} ms")
    elif kind == "queued":
        print(f"queued: position {message['position']}")
    elif kind == "started":
        print(
            f"started {message['mode']}: {message['width']}x{message['height']} at {message['fps']} fps, "
            f"{message['codec']}, seed {message['seed']}, {message['context_frames']} context frames"
        )
        if "context_seconds" in message:
            of = f" of {message['upload_seconds']:.2f} s" if message.get("upload_seconds") is not None else ""
            shown = "as uploaded (resized)" if message["context"] == "original" else "as the model's reconstruction"
            print(f"extending the last {message['context_seconds']:.2f} s{of}, shown {shown}")
        if "warning" in message:
            print(f"warning: {message['warning']}", file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    changes: dict[int, list[dict[str, Any]]] = {}
    for chunk, prompt in args.prompt_at:
        changes.setdefault(int(chunk), []).append({"type": "prompt", "prompt": prompt})
    for chunk, steps in args.steps_at:
        changes.setdefault(chunk, []).append({"type": "steps", "steps": steps})
    source = args.image or args.video
    upload = {"mode": "i2v" if args.image else "v2v", "upload": Path(source).read_bytes()} if source else {}
    if source and args.context:
        upload["context"] = args.context
    began = time.perf_counter()
    async with await StreamClient.connect(args.url, args.token) as client:
        recording = await record(
            client,
            args.output,
            prompt=args.prompt,
            chunks=args.chunks,
            changes=changes,
            on_message=_show,
            seed=args.seed,
            steps=args.steps,
            realtime=args.realtime,
            **upload,
        )
    print(
        f"wrote {args.output}: {recording.frames} frames, {len(recording.chunks)} chunks "
        f"in {time.perf_counter() - began:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamgen-client", description=__doc__)
    parser.add_argument("--url", default="ws://127.0.0.1:8765", help="server address (ws://HOST:PORT)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chunks", type=int, default=10, help="generated chunks to record")
    parser.add_argument("--steps", type=int, help="flow-map steps per chunk (default: the server's)")
    parser.add_argument("--seed", type=int)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", help="extend this image (i2v)")
    source.add_argument("--video", help="extend this video (v2v)")
    parser.add_argument(
        "--context", choices=("reconstruction", "original"),
        help="what the stream shows of --image/--video before its chunks (default: the server's, reconstruction)",
    )  # fmt: skip
    parser.add_argument("--token", help="the server's token, if it requires one")
    parser.add_argument(
        "--prompt-at",
        nargs=2,
        action="append",
        default=[],
        metavar=("CHUNK", "PROMPT"),
        help="switch to PROMPT once chunk CHUNK arrives (repeatable)",
    )
    parser.add_argument(
        "--steps-at",
        nargs=2,
        type=int,
        action="append",
        default=[],
        metavar=("CHUNK", "STEPS"),
        help="switch to STEPS per chunk once chunk CHUNK arrives (repeatable)",
    )
    parser.add_argument("--realtime", action="store_true", help="paced like a live viewer (default: flat out)")
    parser.add_argument("-o", "--output", default="out.mp4")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except InvalidStatus as e:
        print(f"streamgen-client: refused: {e.response.body.decode(errors='replace')}", file=sys.stderr)
    except (StreamError, WebSocketException, OSError, ValueError) as e:
        print(f"streamgen-client: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
