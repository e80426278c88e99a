"""The command-line options that `streamgen`'s commands and the benchmarks share, declared once."""

from __future__ import annotations

import argparse

import torch

_OPTIONS: dict[str, dict] = {
    "model": {"help": "model directory in diffusers' layout (default: the shipped model)"},
    "device": {"help": "cpu or cuda (default: cuda when available)"},
    "threads": {
        "type": int,
        "help": "torch CPU threads (default: %(default)s, None being torch's own; on a shared CPU, 1 avoids "
        "spinning threads' stalls)",
    },
}


def add(parser: argparse.ArgumentParser | argparse._ActionsContainer, *names: str) -> None:
    """Declare the shared options `names` ("model", "device", "threads") on `parser` or an argument group."""
    for name in names:
        parser.add_argument(f"--{name}", **_OPTIONS[name])


def apply_threads(args: argparse.Namespace) -> None:
    """`--threads`, when given, for the rest of the process."""
    if args.threads:
        torch.set_num_threads(args.threads)
