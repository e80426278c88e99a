"""Streaming engine: the chunk forward over diffusers' FAR model, its KV cache and step budgets."""

from .cache import CachedChunk, KVCache, SinkWindow
from .engine import FlowStep, StreamingEngine, TextCondition, flow_schedule

__all__ = ["CachedChunk", "FlowStep", "KVCache", "SinkWindow", "StreamingEngine", "TextCondition", "flow_schedule"]
