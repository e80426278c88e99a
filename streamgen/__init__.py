"""streamgen: endless, live autoregressive video with AnyFlow flow maps on diffusers' FAR model."""

from .config import StreamConfig
from .engine import KVCache, SinkWindow, StreamingEngine, TextCondition
from .pipeline import Session, StreamingPipeline

__all__ = ["KVCache", "Session", "SinkWindow", "StreamConfig", "StreamingEngine", "StreamingPipeline", "TextCondition"]
