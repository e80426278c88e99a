"""streamgen: endless, live autoregressive video with AnyFlow flow maps on diffusers' FAR model.

Names are imported on first use: the CLI starts without loading torch/diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "StreamConfig": ".config",
    "KVCache": ".engine",
    "SinkWindow": ".engine",
    "StreamingEngine": ".engine",
    "TextCondition": ".engine",
    "Session": ".pipeline",
    "StreamingPipeline": ".pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'streamgen' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
