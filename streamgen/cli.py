"""`streamgen generate | serve | bench | train`: thin argument parsing over the library and the server."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys

from . import options
from .config import DEFAULT_FPS, DEFAULT_STEPS


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    options.add(parser, "model", "device")
    parser.add_argument("--height", type=int, help="video height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="video width in pixels (default: the model's)")


def byte_size(text: str) -> int:
    """A number of bytes with an optional K, M or G (binary) suffix."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    number = float(text[:-1] if scale > 1 else text)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive size")
    return int(number * scale)


def port(text: str) -> int:
    """A TCP port number (argparse names this function in its message for a non-number)."""
    number = int(text)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a TCP port (0 to 65535; 0 picks a free one)")
    return number


def generate(args: argparse.Namespace) -> int:
    """Render `--seconds` of video to an MP4, chunk by chunk, with a progress bar."""
    from tqdm import tqdm

    from .media import Mp4Writer
    from .models import is_bidirectional
    from .pipeline import StreamingPipeline

    if args.model and is_bidirectional(args.model):
        return _generate_bidirectional(args)
    pipe = StreamingPipeline.load(args.model, args.device)
    extend = {"image": args.image} if args.image else {"video": args.video} if args.video else {}
    if args.context_seconds is not None:
        stride = pipe.latent_scale[0]  # frames per latent frame after the first: clips are 1 + stride * k frames
        extend["max_context_frames"] = 1 + stride * max(0, round(args.context_seconds * pipe.config.fps / stride))
    shape = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s"
    with tqdm(total=1.0, desc="reading", bar_format=shape, disable=not extend, leave=False) as bar:

        def progress(done: float, total: float) -> None:
            bar.total = round(total, 1)
            bar.update(round(done, 1) - bar.n)

        session = pipe.start_session(
            args.prompt, seed=args.seed, steps=args.steps, height=args.height, width=args.width,
            keep_input=args.keep_input, progress=progress, **extend,
        )  # fmt: skip
    fps = session.fps
    if session.context is not None:
        _describe(session.context, "image" if args.image else "video")
    target = max(1, math.ceil(args.seconds * fps))
    with session, Mp4Writer(args.output, fps=fps) as writer:
        if session.context_frames is not None:
            writer.write(session.context_frames)
        with tqdm(total=target, unit="frame", desc="generating") as bar:
            done = 0
            while done < target:
                frames = session.next_chunk()
                writer.write(frames)
                done += len(frames)
                bar.update(len(frames))
                bar.set_postfix(chunk_ms=f"{1000 * session.timing.total:.0f}")
    print(f"wrote {args.output} ({writer.frames_written} frames at {fps} fps)")
    return 0


def _describe(clip, kind: str) -> None:
    """Tell what part of the input is extended, and what was wrong with it."""
    if clip.damaged:
        print(f"streamgen generate: warning: the {kind} is damaged: {clip.damaged}", file=sys.stderr)
    if kind == "video" and clip.source_seconds is not None and clip.source_seconds > clip.seconds + 1 / clip.fps:
        print(f"extending the last {clip.seconds:.2f} s of the {clip.source_seconds:.2f} s clip (--context-seconds)")


def _generate_bidirectional(args: argparse.Namespace) -> int:
    """NVIDIA's bidirectional AnyFlow-Wan2.1-T2V cannot stream: render the whole clip with diffusers' pipeline."""
    import torch
    from diffusers import AnyFlowPipeline

    from .media import write_mp4
    from .pipeline import default_device, default_dtype

    device = torch.device(args.device) if args.device else default_device()
    pipe = AnyFlowPipeline.from_pretrained(args.model, torch_dtype=default_dtype(device)).to(device)
    stride = pipe.vae.config.scale_factor_temporal  # video frames per latent frame after the first
    frames = 1 + stride * max(0, math.ceil(args.seconds * DEFAULT_FPS / stride))
    size = {"height": args.height, "width": args.width}
    video = pipe(
        prompt=args.prompt,
        num_frames=frames,
        num_inference_steps=args.steps or DEFAULT_STEPS,
        generator=torch.Generator().manual_seed(args.seed or 0),
        output_type="np",
        **{name: value for name, value in size.items() if value is not None},  # unset: the pipeline's own
    ).frames[0]
    write_mp4(args.output, (video * 255).round().astype("uint8"), fps=DEFAULT_FPS)
    print(f"wrote {args.output} ({len(video)} frames, bidirectional AnyFlow: rendered whole, not streamed)")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """`streamgen serve`: the websocket server, or with `--ray` its Ray Serve deployment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # not a line per HTTP request
    if not args.ray:
        from streamgen_server import app

        return app.main(args)
    try:
        from streamgen_server import rayserve
    except ImportError as e:
        raise RuntimeError(f"--ray needs Ray Serve: pip install -e '.[ray]' ({e})") from None
    return rayserve.main(args)


# Commands that own their flags: `streamgen bench ...` is `streamgen.bench.main([...])`. Training is not part of the
# runtime: `streamgen train` runs the recipe of the `train` extra when it is installed.
DELEGATED = {"bench": "streamgen.bench", "train": "streamgen_train.cli"}


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag of `streamgen` (what `main` parses; scripts that start a server their own way parse
    with it too, so they run with exactly the CLI's defaults)."""
    parser = argparse.ArgumentParser(prog="streamgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="render a prompt to an MP4")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--seconds", type=float, default=5.0)
    gen.add_argument("--steps", type=int, help="flow-map steps per chunk (default: the model's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("-o", "--output", default="out.mp4")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--image", help="extend this image (I2V)")
    source.add_argument("--video", help="extend this video (V2V)")
    gen.add_argument(
        "--context-seconds", type=float, help="extend the last this many seconds of --video (default: about 2)"
    )
    gen.add_argument(
        "--keep-input", action="store_true",
        help="start the output with the input frames themselves (resized), not the model's reconstruction of them",
    )  # fmt: skip
    _add_model_args(gen)
    gen.set_defaults(run=generate)

    serve = commands.add_parser("serve", help="live websocket server with a browser page")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port, default=8765)
    serve.add_argument("--max-sessions", type=int, default=2)
    serve.add_argument(
        "--memory-budget",
        type=byte_size,
        help="bytes sessions may hold, e.g. 8G (default: 80%% of free GPU memory, or half the available RAM)",
    )
    serve.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode and encode on a second thread while the next turn denoises (pays with a free core: "
        "benchmarks/results/serving.md; --no-overlap on a CPU that other work keeps busy)",
    )
    serve.add_argument("--token", help="require this token from clients")
    serve.add_argument(
        "--allow-origin", action="append", metavar="ORIGIN", help="also accept pages from ORIGIN (repeatable)"
    )
    serve.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="a host name clients reach the server as, besides --host, localhost and IP addresses (repeatable; "
        "'*' for any, behind a proxy that checks it)",
    )
    # Limits: unset means the server's default (docs/protocol.md).
    serve.add_argument("--max-sessions-per-client", type=int, help="live sessions per client IP address")
    serve.add_argument("--max-pause-seconds", type=float, help="a session paused longer is stopped")
    ray = serve.add_argument_group("Ray Serve (pip install -e '.[ray]'; docs/scaling.md)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: one replica per device, same protocol")
    replicas = ray.add_mutually_exclusive_group()
    replicas.add_argument("--replicas", type=int, default=1, help="a fixed number of replicas")
    replicas.add_argument("--min-replicas", type=int, help="autoscale on sessions from this many replicas...")
    ray.add_argument("--max-replicas", type=int, help="...to this many")
    ray.add_argument("--address", help="join this Ray cluster ('auto': the one started with `ray start`)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    serve.set_defaults(run=serve_command)

    # DELEGATED commands own their flags.
    commands.add_parser("bench", help="latency and fps per step budget (streamgen bench --help)")
    commands.add_parser("train", help="train the default model (streamgen train --help; the train extra)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        try:
            command = importlib.import_module(DELEGATED[argv[0]])
        except ImportError as e:
            if argv[0] != "train" or not (e.name or "").startswith("streamgen_train"):
                raise
            print(
                "streamgen train: error: the training recipe is not installed: pip install 'streamgen[train]' "
                "(from a checkout: pip install -e './train')",
                file=sys.stderr,
            )
            return 2
        return command.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"streamgen {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
