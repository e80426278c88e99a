"""The adaptive step budget, fed synthetic latencies: no model, so each case runs in microseconds."""

from __future__ import annotations

import math
import random

import pytest

from streamgen.budget import ChunkReport, StepController, Usage
from streamgen.pipeline import batch_shares

FPS = 16
FRAMES = 12  # a 3-latent-frame chunk: deadline 0.75 s
FIXED, PER_STEP = 0.10, 0.02  # seconds: cache + decode, one denoising forward


def best_steps(sessions: int, headroom: float = 0.9) -> int:
    """The largest equal budget for `sessions` round-robin sessions that meets the deadline with headroom."""
    return math.floor((headroom * FRAMES / FPS / sessions - FIXED) / PER_STEP)


def round_robin(schedule: list[int], noise: float = 0.0, seed: int = 0) -> list[list[tuple[int, float]]]:
    """Simulate sessions taking turns on one device; `schedule[i]` sessions take part in round `i` (sessions
    join and leave at the end). Returns, per round, each session's (steps, seconds since its previous chunk)."""
    rng = random.Random(seed)
    usage, clock = Usage(), 0.0
    sessions: list[dict] = []
    rounds = []
    for count in schedule:
        while len(sessions) < count:
            sessions.append({"budget": StepController(FPS), "ready": None, "seen": (usage.busy, usage.chunks)})
        del sessions[count:]
        rounds.append([])
        for s in sessions:
            steps = s["budget"].choose(FRAMES)
            denoise = steps * PER_STEP * (1 + rng.gauss(0, noise))
            busy = FIXED * (1 + rng.gauss(0, noise)) + denoise
            clock += busy
            usage.record(busy)
            seen_busy, seen_chunks = s["seen"]
            s["seen"] = (usage.busy, usage.chunks)
            if s["ready"] is not None:
                others = usage.busy - seen_busy - busy
                s["budget"].observe(ChunkReport(steps, denoise, busy, others, usage.chunks - seen_chunks))
                rounds[-1].append((steps, clock - s["ready"]))
            s["ready"] = clock
    return rounds


def test_converges_to_the_largest_budget_that_meets_the_deadline():
    rounds = round_robin([1] * 8)
    steps = [chunk[0][0] for chunk in rounds[1:]]
    assert steps[0] == 4  # the config's budget until the first measurement
    assert steps[-3:] == [best_steps(1)] * 3
    assert all(wall <= FRAMES / FPS for chunk in rounds for _, wall in chunk)


def test_backs_off_when_sessions_join_and_recovers_when_they_leave():
    rounds = round_robin([1] * 10 + [2] * 12 + [4] * 12 + [1] * 20)
    settled = {2: rounds[21], 4: rounds[33], 1: rounds[-1]}
    for sessions, chunk in settled.items():
        assert [steps for steps, _ in chunk] == [best_steps(sessions)] * sessions, sessions
        assert all(wall <= FRAMES / FPS for _, wall in chunk)
    # The incumbent learns of the newcomer from the chunk that ran while the newcomer started; the next one fits.
    assert rounds[12][0][0] == best_steps(2)
    # Recovery is gradual (a fall in cost is smoothed) but monotonic.
    recovery = [chunk[0][0] for chunk in rounds[34:]]
    assert recovery == sorted(recovery) and recovery[0] < recovery[-1] == best_steps(1)


def test_equal_sessions_share_fairly_and_rarely_miss_under_jitter():
    rounds = round_robin([1] * 5 + [2] * 30 + [4] * 30, noise=0.1, seed=1)
    for settled, sessions in ((rounds[20:35], 2), (rounds[50:], 4)):
        chunks = [c for chunk in settled for c in chunk]
        misses = sum(wall > FRAMES / FPS for _, wall in chunks)
        assert misses <= len(chunks) // 20
        per_session = [sum(chunk[i][0] for chunk in settled) / len(settled) for i in range(sessions)]
        assert max(per_session) - min(per_session) <= 2  # without the fair-share bound: 21 steps against 1


def test_never_below_one_step_nor_above_the_maximum():
    budget = StepController(FPS, max_steps=8)
    budget.observe(ChunkReport(steps=4, denoise=0.4, busy=5.0, others=10.0, sessions=3))
    assert budget.choose(FRAMES) == 1
    fast = StepController(FPS, max_steps=8)
    fast.observe(ChunkReport(steps=4, denoise=0.004, busy=0.01))
    assert fast.choose(FRAMES) == 8


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="target_fps"):
        StepController(0)
    with pytest.raises(ValueError, match="steps"):
        StepController(FPS, max_steps=0)
    with pytest.raises(ValueError, match="headroom"):
        StepController(FPS, headroom=1.5)


def test_batch_shares_charge_each_chunk_for_the_forwards_it_took_part_in():
    assert batch_shares(1.0, [2, 2, 2, 2]) == [0.25] * 4
    small, large = batch_shares(0.5, [4, 26])  # 26 forwards of 19.2 ms: 4 of them shared by both chunks
    assert small == pytest.approx(4 * 0.5 / 26 / 2) and small + large == pytest.approx(0.5)
