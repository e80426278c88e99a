"""The chunk runner: every driver of generation (the server's scheduler, `streamgen bench`, the benchmarks) runs
its streams' chunks through one `Runner`.

A turn takes the streams that are ready and, for each, chooses its budget: a fixed step count, or "auto", the most
steps that hold its target rate given what the device really spends on every stream of this runner
(`streamgen.budget`). It runs one batched denoise across them (`engine.batch`: different prompts, budgets and
positions in their streams share each transformer call; chunks of different shapes, e.g. a stream's 1-frame first
chunk, run as separate groups), commits each stream's cache, then decodes and H.264-encodes each chunk and returns
one `MediaChunk` per stream. A stream's frames are the same batched as alone (`tests/test_runtime.py`).

The two halves of a turn are separate calls (`denoise`, then `deliver` per chunk) so that a server may decode and
encode one turn's chunks while the next turn denoises. A stream that splits its chunks (`Stream.split`, a live
viewer's) gets each chunk a latent frame at a time: each piece (4 frames) is decoded, encoded and handed over before
the next is decoded, so its first frames can be shown after a third of the chunk's decode rather than all of it. A
control change (`Stream.set_prompt`, `set_budget`) that arrives while a stream's chunk is being denoised does not
wait for the next chunk: the chunk is dropped before it is committed and denoised again under the change, from the
same noise, in the same turn.

Memory is admitted as an LLM server budgets KV blocks: a stream's most bytes (its cache's capacity and its decoder's
state) are known before it opens, and a stream is admitted only while the sum fits the runner's budget.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .budget import StepController
from .config import StreamConfig, check_steps
from .engine import SinkWindow
from .media import FragmentedMp4Encoder, Segment
from .pipeline import ChunkTiming, Session, StreamingPipeline
from .vae import StreamingDecoder

AUTO = "auto"
Steps = int | Literal["auto"] | None  # None: the model's default budget
# Default memory budget: this share of the device's free memory (CUDA) or of the machine's available RAM (CPU),
# leaving the rest to the weights' activations, the batched call's transient context and everything else.
CUDA_MEMORY_SHARE = 0.8
CPU_MEMORY_SHARE = 0.5


@dataclass
class MediaChunk:
    """One chunk of a stream, or one piece of it (`Stream.split`), encoded and ready to send, with where its time went:
    the one per-chunk record. A chunk's pieces share its record (`timing`: complete on its last piece)."""

    index: int | None  # generated chunk number; None for the reconstruction of an uploaded image or clip
    first_frame: int  # position in the stream's timeline
    frames: int
    segments: list[Segment]  # the init segment first in a stream's first media, then fragments
    steps: int | None  # the steps this chunk was denoised with
    prompt: str | None
    timing: ChunkTiming
    batch: int = 1  # chunks denoised in the same transformer calls, this one included
    transition: dict[str, Any] | None = None  # in a prompt transition: {"from": prompt, "weight": the new one's share}
    remade: bool = False  # denoised twice: a control change came while it was first denoised (`Runner.denoise`)
    ready: float = field(default_factory=time.perf_counter)  # when it was encoded (`time.perf_counter`)
    offset: int = 0  # frames of its chunk before this piece
    last: bool = True  # the chunk's last piece (a whole chunk is its only piece)


class Stream:
    """One stream as the runner sees it: what was asked for (prompt, seed, budget, an image or clip to extend),
    its library session and H.264 encoder once open, and its timeline.

    Changes (`set_prompt`, `set_budget`) take effect at the chunk being denoised when they arrive (it is made again
    under them, see `Runner.denoise`), else at the next one. A driver may make them from another thread than the
    runner's."""

    split = False  # deliver each chunk a latent frame at a time (`Runner.deliver`); a server's live viewers do

    def __init__(
        self,
        prompt: str,
        *,
        seed: int | None = None,
        steps: Steps = None,
        target_fps: float | None = None,
        image: np.ndarray | None = None,
        video: np.ndarray | None = None,
        keep_input: bool = False,
    ) -> None:
        self.prompt = prompt
        self.seed = seed  # None: the session draws one
        self.changes = 0  # control changes so far: a chunk denoised while one arrived is made again
        self.set_budget(steps, target_fps)
        self.image, self.video = image, video  # handed to the session when it opens, then dropped
        self.keep_input = keep_input  # show the image or clip itself, not its reconstruction (`start_session`)
        self._prompts: deque[tuple[str, int]] = deque(maxlen=1)  # (prompt, transition) to apply; the latest wins
        self.session: Session | None = None
        self.encoder: FragmentedMp4Encoder | None = None
        self.reserved = 0  # bytes the runner holds for this stream while it is admitted
        self.chunks = 0  # generated chunks
        self.frames = 0  # frames encoded: the timeline's end

    def set_budget(self, steps: Steps, target_fps: float | None = None) -> None:
        """A fixed step count, the model's default (None), or "auto" at `target_fps` (default: the stream's fps)."""
        if steps not in (None, AUTO):
            check_steps(steps)
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {target_fps}")
        self.steps, self.target_fps = steps, target_fps
        self.changes += 1

    def set_prompt(self, prompt: str, transition: int = 0) -> None:
        """Follow `prompt` from the next chunk denoised, blended in over `transition` chunks (`Session.set_prompt`)."""
        self._prompts.append((prompt, transition))
        self.changes += 1

    def _apply_prompt(self) -> None:
        """On the runner's thread: the latest prompt asked for, if any, to the session."""
        try:
            prompt, transition = self._prompts.popleft()
        except IndexError:
            return
        self.session.set_prompt(prompt, transition=transition)

    @property
    def auto(self) -> bool:
        return self.steps == AUTO

    @property
    def nbytes(self) -> int:
        """Model memory this stream holds now (KV and decoder caches)."""
        return self.session.nbytes if self.session is not None else 0

    def _budget(self) -> int | None:
        """The next chunk's fixed steps, or None for the session's controller (auto) or default. An auto stream's
        controller follows its target; one that already learned costs is kept across changes."""
        session = self.session
        if not self.auto:
            return self.steps
        target = self.target_fps or session.fps
        if session.budget is None:
            session.budget = StepController(target, steps=session.last_steps or session.config.steps)
        session.budget.target_fps = target
        return None

    def _encode(
        self, index: int | None, frames: np.ndarray, timing: ChunkTiming, steps: int | None, batch: int
    ) -> MediaChunk:
        start = time.perf_counter()
        segments = self.encoder.encode(frames)
        timing.encode += time.perf_counter() - start
        chunk = MediaChunk(index, self.frames, len(frames), segments, steps, self.session.prompt, timing, batch)
        self.frames += len(frames)
        return chunk

    def release(self) -> None:
        """Free the model state (KV and decoder caches) and the encoder now, not whenever the GC runs."""
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.encoder is not None:
            self.encoder.flush()
            self.encoder = None
        self.image = self.video = None


@dataclass
class _Plan:
    """A stream's chunk as planned for a turn (`Session._begin`), and the session state planning it changed, so that
    it can be planned again (`Runner.denoise`) as if the plan had never been made."""

    stream: Stream
    changes: int  # the stream's control changes when it was planned
    first: bool
    steps: int
    noise: torch.Tensor
    transition: dict[str, Any] | None  # `MediaChunk.transition`
    rewind: tuple[torch.Tensor, Any, Any, int]  # noise generator state, text condition, transition and its progress
    remade: bool = False  # planned again

    @classmethod
    def make(cls, stream: Stream) -> _Plan:
        changes = stream.changes  # read first: a change that comes while the plan is made is not missed
        stream._apply_prompt()
        session = stream.session
        blend = session.transition
        rewind = (session.generator.get_state(), session.text, blend, blend.done if blend is not None else 0)
        first = session.chunk_index == 0
        steps, noise = session._begin(stream._budget(), None, "np")
        blend = session.transition
        transition = {"from": blend.source_prompt, "weight": blend.weight} if blend is not None else None
        return cls(stream, changes, first, steps, noise, transition, rewind)

    def remake(self) -> _Plan:
        """The plan again, under the stream's controls now: the same noise, the prompt and steps changed since."""
        session = self.stream.session
        state, session.text, session.transition, done = self.rewind
        if session.transition is not None:
            session.transition.done = done
        session.generator.set_state(state)
        plan = _Plan.make(self.stream)
        plan.remade = True
        return plan


@dataclass
class Denoised:
    """A stream's chunk after the batched denoise and its cache commit, waiting to be decoded and encoded."""

    stream: Stream
    latents: torch.Tensor
    steps: int
    timing: ChunkTiming  # transformer and cache so far
    share: float  # this stream's part of the batched denoising time
    batch: int
    first: bool  # the stream's first chunk: shorter, no deadline, not shown to its budget
    prompt: str | None  # as it was denoised (the stream's may change while the chunk waits to be encoded)
    transition: dict[str, Any] | None  # `MediaChunk.transition`, taken when it was denoised
    remade: bool  # `MediaChunk.remade`


class Runner:
    """Runs the chunks of the streams of one pipeline, turn by turn, and budgets their memory.

    Not thread-safe by itself: a driver calls `open`, `denoise` and `release` from one thread; `deliver` may run
    on another, in the order of the chunks of each stream."""

    def __init__(self, pipe: StreamingPipeline, memory_budget: int | None = None) -> None:
        self.pipe = pipe
        self.memory_budget = default_memory_budget(pipe.device) if memory_budget is None else int(memory_budget)
        if self.memory_budget <= 0:
            raise ValueError(f"the memory budget must be positive, got {self.memory_budget} bytes")
        self.reserved = 0  # bytes held for the admitted streams
        self.batch_sizes: Counter[int] = Counter()  # transformer batches run, by their number of chunks
        # Remake a chunk whose stream's controls changed while it was denoised (`denoise`); off, the change waits for
        # the next chunk (what benchmarks/interaction.py compares).
        self.remake = True
        self.remade = 0  # chunks made again so far

    # -- memory --------------------------------------------------------------------------------------------
    def stream_bytes(self) -> int:
        """The most memory one stream of this pipeline's config holds (its reservation)."""
        return session_bytes(self.pipe, self.pipe.config)

    def admit(self, stream: Stream) -> bool:
        """Reserve the stream's bytes if they fit the budget with everything admitted before; False if not."""
        need = self.stream_bytes()
        if self.reserved + need > self.memory_budget:
            return False
        stream.reserved = need
        self.reserved += need
        return True

    def release(self, stream: Stream) -> None:
        """Free the stream's session and encoder, and its reservation."""
        stream.release()
        self.reserved -= stream.reserved
        stream.reserved = 0

    # -- chunks --------------------------------------------------------------------------------------------
    def open(self, stream: Stream) -> MediaChunk | None:
        """Start the stream's session and encoder; an uploaded image or clip, reconstructed, is its first media."""
        extend = {"image": stream.image} if stream.image is not None else {"video": stream.video}
        session = self.pipe.start_session(stream.prompt, seed=stream.seed, keep_input=stream.keep_input, **extend)
        stream.session, stream.seed = session, session.seed
        stream.image = stream.video = None
        stream.encoder = FragmentedMp4Encoder(session.config.width, session.config.height, fps=session.config.fps)
        if session.context_frames is None:
            return None
        return stream._encode(None, session.context_frames, ChunkTiming(), None, 1)

    def denoise(self, streams: list[Stream]) -> list[Denoised]:
        """The first half of a turn: each open stream's next chunk denoised, batched with the others of its shape
        (one transformer call per step per group), and committed to its cache.

        A stream whose controls changed while its chunk was denoised gets that chunk dropped (it was never committed,
        decoded or sent) and denoised again under the change from the same noise: the chunk the change would have
        given had it come before the turn, sooner than waiting for the next chunk, at the cost of one more denoise.
        Once per turn, so that a flood of changes cannot hold the turn."""
        results = self._denoise([_Plan.make(stream) for stream in streams])
        changed = [i for i, (plan, *_) in enumerate(results) if plan.stream.changes != plan.changes and self.remake]
        if changed:
            self.remade += len(changed)
            redone = self._denoise([results[i][0].remake() for i in changed])
            for i, (plan, z, seconds, share, batch) in zip(changed, redone):
                _, _, spent, spent_share, _ = results[i]  # the dropped chunk's time counts too
                results[i] = (plan, z, spent + seconds, spent_share + share, batch)
        denoised = []
        for plan, z, seconds, share, batch in results:
            session = plan.stream.session
            timing = session._commit(z, seconds)
            denoised.append(Denoised(
                plan.stream, z, plan.steps, timing, share, batch, plan.first, session.prompt, plan.transition,
                plan.remade,
            ))  # fmt: skip
        return denoised

    def _denoise(self, plans: list[_Plan]) -> list[tuple[_Plan, torch.Tensor, float, float, int]]:
        """Each plan's chunk denoised, batched with the others of its shape: (plan, latents, seconds the call took,
        the stream's share of them, chunks in the call), in the plans' order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(tuple(plan.noise.shape[1:]), []).append(i)
        results: list = [None] * len(plans)
        for group in groups.values():
            sessions = [plans[i].stream.session for i in group]
            latents, seconds, shares = self.pipe.denoise(sessions, [(plans[i].steps, plans[i].noise) for i in group])
            self.batch_sizes[len(group)] += 1
            for i, z, share in zip(group, latents, shares):
                results[i] = (plans[i], z, seconds, share, len(group))
        return results

    def deliver(self, chunk: Denoised) -> Iterator[MediaChunk]:
        """The second half: decode and encode a denoised chunk, and account its time to the stream's budget. Yields
        the chunk whole, or for a stream that splits (`Stream.split`) a piece per latent frame, each as soon as it is
        encoded: the decoder is causal, so decoding latent frame by latent frame gives the same frames."""
        stream, session, latents = chunk.stream, chunk.stream.session, chunk.latents
        step = 1 if stream.split else latents.shape[1]
        offset = 0
        for start in range(0, latents.shape[1], step):
            frames = session._decode(latents[:, start : start + step], chunk.steps, chunk.timing, "np")
            piece = stream._encode(stream.chunks, frames, chunk.timing, chunk.steps, chunk.batch)
            piece.prompt, piece.transition, piece.remade = chunk.prompt, chunk.transition, chunk.remade
            piece.offset, piece.last = offset, start + step >= latents.shape[1]
            offset += piece.frames
            if piece.last:
                stream.chunks += 1
                session._account(chunk.timing, chunk.steps, chunk.share, chunk.first)
            yield piece

    def turn(self, streams: list[Stream]) -> list[MediaChunk]:
        """A whole turn: one chunk of each stream (its pieces, for a stream that splits), in the streams' order."""
        return [piece for chunk in self.denoise(streams) for piece in self.deliver(chunk)]


def session_bytes(pipe: StreamingPipeline, config: StreamConfig) -> int:
    """The most memory a session of `config` holds: its KV cache's capacity (slabs and retained latents) and its
    VAE decoder's causal state. Known before the session starts; nothing is allocated to compute it."""
    scale = pipe.latent_scale[1]
    latent_size = (config.height // scale, config.width // scale)
    cache = pipe.engine.new_cache(latent_size, config.max_chunk_frames, SinkWindow(config.sink, config.window))
    rows = 2 if config.guidance_scale > 1 else 1
    return pipe.engine.cache_bytes(cache, rows) + _decoder_bytes(pipe.vae, latent_size)


@lru_cache(maxsize=8)
def _decoder_bytes(vae: AutoencoderKLWan, latent_size: tuple[int, int]) -> int:
    """The streaming decoder's state once full (after two latent frames), measured on the meta device: shapes
    only, no memory, no arithmetic. The state is activations in the VAE's dtype; the shadow runs in float32."""
    with torch.device("meta"):
        shadow = AutoencoderKLWan.from_config(vae.config)
    decoder = StreamingDecoder(shadow)
    decoder.decode(torch.zeros(1, 2, vae.config.z_dim, *latent_size, device="meta"))
    return decoder.nbytes * vae.dtype.itemsize // torch.float32.itemsize


def default_memory_budget(device: torch.device) -> int:
    """A share of the free memory of a CUDA device, or of the available RAM on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_MEMORY_SHARE * free)
    return int(CPU_MEMORY_SHARE * _available_ram())


def _available_ram() -> int:
    """Linux's estimate of memory available without swapping (free plus reclaimable caches), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
