"""Adaptive step budget: per chunk, the most flow-map steps that still deliver the stream at its target rate.

A chunk of `F` video frames must be ready within `F / fps` seconds of the previous one. Its cost is a part that
scales with the steps (the denoising forwards) and a part that does not (cache update, decode), plus whatever
the device spends on other sessions in between. The controller learns three costs from each finished chunk:
seconds per step, the session's fixed seconds per chunk, and the other sessions' seconds between two of its
chunks. Rises in cost are taken at once (a session that starts shows in the next chunk), falls are smoothed
(recovery is gradual, so one fast chunk does not trigger a miss). Two bounds pick the steps:

* the deadline: `others + fixed + steps * step <= headroom * deadline`;
* a fair share: `fixed + steps * step <= headroom * deadline / sessions`. Without it, sessions sharing a device
  are stable in any split of the time, and the first one to arrive keeps most of it; with it, equal sessions
  converge to equal budgets. (It assumes the others use their share: next to light fixed-budget sessions, an
  adaptive one leaves some time unused.)

Other sessions' time is the device's busy time, not the wall clock, so a scheduler that paces a stream to its
viewer (waits between chunks) does not read as load. Pure logic, fed measured numbers: see `tests/test_budget.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import DEFAULT_STEPS, MAX_STEPS, check_steps


@dataclass(frozen=True)
class ChunkReport:
    """Where the time of one chunk of a session went, and what else the device did since the session's last."""

    steps: int
    denoise: float  # seconds in the denoising forwards: the part that scales with `steps`
    busy: float  # seconds the chunk occupied the device: denoise + cache update + decode
    others: float = 0.0  # seconds the device spent on other sessions since this session's previous chunk
    sessions: int = 1  # sessions served in that interval, this one included


@dataclass
class Usage:
    """A device's busy time and chunk count over all its sessions: how a session sees the others' load."""

    busy: float = 0.0
    chunks: int = 0

    def record(self, seconds: float) -> None:
        self.busy += seconds
        self.chunks += 1


@dataclass
class StepController:
    """Chooses each chunk's step count to hold `target_fps`; never below 1, never above `max_steps`."""

    target_fps: float
    max_steps: int = MAX_STEPS
    steps: int = DEFAULT_STEPS  # the choice until the first report, then the latest choice
    headroom: float = 0.9  # plan for this fraction of the deadline: jitter and work outside the pipeline
    smoothing: float = 0.3  # weight of a new measurement when a cost falls
    step_cost: float | None = field(default=None, init=False)
    fixed_cost: float | None = field(default=None, init=False)
    others_cost: float = field(default=0.0, init=False)
    sessions: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        if not self.target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {self.target_fps}")
        check_steps(self.max_steps)
        check_steps(self.steps)
        if not 0 < self.headroom <= 1 or not 0 < self.smoothing <= 1:
            raise ValueError("headroom and smoothing must lie in (0, 1]")

    def deadline(self, frames: int) -> float:
        """Seconds a chunk of `frames` video frames may take at the target rate."""
        return frames / self.target_fps

    def choose(self, frames: int) -> int:
        """Steps for the next chunk of `frames` video frames."""
        if self.step_cost is not None:
            budget = self.headroom * self.deadline(frames)
            fits = (budget - self.others_cost - self.fixed_cost) / self.step_cost
            fair = (budget / self.sessions - self.fixed_cost) / self.step_cost
            self.steps = max(1, min(self.max_steps, math.floor(min(fits, fair))))
        return self.steps

    def observe(self, report: ChunkReport) -> None:
        """Learn from a finished chunk (not a stream's first: it is shorter and has no deadline)."""
        self.step_cost = self._track(self.step_cost, report.denoise / report.steps)
        self.fixed_cost = self._track(self.fixed_cost, max(0.0, report.busy - report.denoise))
        self.others_cost = self._track(self.others_cost, report.others)
        self.sessions = report.sessions

    def _track(self, estimate: float | None, measured: float) -> float:
        if estimate is None or measured >= estimate:
            return measured
        return estimate + self.smoothing * (measured - estimate)
