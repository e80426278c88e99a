"""`StreamingPipeline` (the loaded components) and `Session` (one endless stream over them).

The components are exactly diffusers' `AnyFlowFARPipeline`'s, so its directories load and ours load in diffusers.
A pipeline is shared by every session; a session owns its state: KV cache, VAE decoder cache, noise generator,
prompt. `next_chunk` is the whole inference path: noise -> `steps` flow-map jumps -> cache update -> decode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from diffusers import AnyFlowFARPipeline, AutoencoderKLWan, FlowMapEulerDiscreteScheduler
from transformers import AutoTokenizer, UMT5EncoderModel

from . import inputs, media
from .budget import ChunkReport, StepController, Usage
from .config import StreamConfig, check_steps
from .engine import SinkWindow, StreamingEngine, TextCondition
from .engine.batch import DenoiseRequest, denoise_batch
from .models import NotCausalError, is_bidirectional, load_transformer
from .text import PromptEncoder
from .vae import StreamingDecoder, encode_video, to_uint8_frames

COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
STREAM_CONFIG = "stream_config.json"  # our addition to the diffusers layout: the model's stream defaults
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"
_MODEL_DEFAULT = object()  # "not given": take the model's stream config


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators (what the checkpoints are served in), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class ChunkTiming:
    """Where one chunk's time went, in seconds: the one per-chunk timing record of the library, the runner
    (`streamgen.runtime`, which adds the H.264 encode), the server and the benchmarks."""

    transformer: float = 0.0  # the denoising forwards (a batched call's whole time for each of its chunks)
    cache: float = 0.0
    decode: float = 0.0
    encode: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, stage) for stage in STAGES)


STAGES = tuple(field.name for field in dataclasses.fields(ChunkTiming))  # the one list of stage names


@dataclass
class Transition:
    """A prompt change spread over `chunks` chunks: the i-th (1 to `chunks`) is conditioned on the text embeddings
    `source + i / chunks * (target - source)`, so the last is wholly the new prompt."""

    source: TextCondition
    target: TextCondition
    source_prompt: str | None
    target_prompt: str | None
    chunks: int
    done: int = 0  # chunks made under it so far

    @property
    def weight(self) -> float:
        """The new prompt's share in the latest chunk."""
        return self.done / self.chunks

    def advance(self) -> TextCondition:
        """The next chunk's condition."""
        self.done += 1
        embeds = torch.lerp(self.source.embeds, self.target.embeds, self.weight)
        return TextCondition(embeds, self.target.negative, self.target.guidance_scale)


class StreamingPipeline:
    def __init__(
        self,
        transformer,
        vae: AutoencoderKLWan,
        scheduler: FlowMapEulerDiscreteScheduler,
        text_encoder: UMT5EncoderModel,
        tokenizer,
        config: StreamConfig | None = None,
        example_prompts: list[str] | None = None,
    ) -> None:
        self.transformer, self.vae, self.scheduler = transformer, vae, scheduler
        self.example_prompts = list(example_prompts or [])  # prompts the model draws, recorded at export
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.config = config or StreamConfig()
        self.engine = StreamingEngine(transformer, scheduler)
        self.prompts = PromptEncoder(tokenizer, text_encoder)
        self.usage = Usage()  # device time over all sessions: what adaptive budgets see of each other
        self._encoding = threading.Lock()  # the Wan VAE's encoder keeps its causal cache on the module

    # -- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> "StreamingPipeline":
        """Load a directory in `AnyFlowFARPipeline`'s layout (NVIDIA's checkpoints, `save_pretrained` output)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        if is_bidirectional(directory):
            raise NotCausalError(directory)
        missing = [name for name in COMPONENTS if not (directory / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{directory} lacks pipeline component(s): {', '.join(missing)}")
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        stream = json.loads((directory / STREAM_CONFIG).read_text()) if (directory / STREAM_CONFIG).is_file() else {}
        stream.pop("max_sequence_length", None)  # older exports wrote it; the tokenizer's limit is the one source
        example_prompts = stream.pop("example_prompts", [])
        transformer = load_transformer(directory / "transformer", dtype).to(device)
        # A stream is chunked as the model was trained, unless our stream config says otherwise.
        partition = transformer.config.get("chunk_partition") or []
        stream = dict(zip(("first_chunk_frames", "chunk_frames"), partition[:2])) | stream
        return cls(
            transformer=transformer,
            vae=AutoencoderKLWan.from_pretrained(directory / "vae", torch_dtype=dtype).to(device).eval(),
            scheduler=FlowMapEulerDiscreteScheduler.from_pretrained(directory / "scheduler"),
            text_encoder=UMT5EncoderModel.from_pretrained(directory / "text_encoder", torch_dtype=dtype).to(device).eval(),
            tokenizer=AutoTokenizer.from_pretrained(directory / "tokenizer"),
            config=StreamConfig(**stream),
            example_prompts=example_prompts,
        )

    @classmethod
    def default(cls, device: str | torch.device | None = None) -> "StreamingPipeline":
        """The small model trained by `streamgen train` and shipped in the package."""
        if not (DEFAULT_MODEL / "model_index.json").is_file():
            raise FileNotFoundError(f"the default model is missing at {DEFAULT_MODEL}; run `streamgen train all`")
        return cls.from_pretrained(DEFAULT_MODEL, device=device)

    @classmethod
    def load(cls, model: str | Path | None = None, device: str | torch.device | None = None) -> "StreamingPipeline":
        """`--model` as every command takes it: a model directory, or None for the shipped model."""
        return cls.default(device=device) if model is None else cls.from_pretrained(model, device=device)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write diffusers' `AnyFlowFARPipeline` layout plus our stream defaults (ignored by diffusers)."""
        self.as_reference().save_pretrained(directory)
        stream = dataclasses.asdict(self.config) | {"example_prompts": self.example_prompts}
        (Path(directory) / STREAM_CONFIG).write_text(json.dumps(stream, indent=2) + "\n")

    def as_reference(self) -> AnyFlowFARPipeline:
        """diffusers' reference pipeline over the same components (our oracle and baseline)."""
        return AnyFlowFARPipeline(
            transformer=self.transformer,
            vae=self.vae,
            scheduler=self.scheduler,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
        )

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def latent_scale(self) -> tuple[int, int]:
        """(temporal, spatial) VAE strides."""
        return self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial

    def known_words(self) -> list[str] | None:
        """Every word a closed word-level tokenizer knows (any other encodes as unknown), so a client can point out
        the words of a prompt the model cannot read; None for subword tokenizers (UMT5), which spell any word."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not isinstance(backend.model, tokenizers.models.WordLevel):
            return None
        special = set(self.tokenizer.all_special_tokens)
        return sorted(word for word in self.tokenizer.get_vocab() if word not in special)

    # -- sessions ------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        return self.prompts.encode(prompt).to(self.engine.dtype)

    def start_session(
        self,
        prompt: str | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt: str = "",
        seed: int | None = None,
        steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        image=None,
        video=None,
        window: int | None = _MODEL_DEFAULT,
        sink: int | None = None,
        guidance_scale: float | None = None,
        target_fps: float | None = None,
        max_context_frames: int = inputs.DEFAULT_CONTEXT_FRAMES,
        keep_input: bool = False,
        progress: media.Progress | None = None,
    ) -> "Session":
        """Open a stream. `image`/`video` become its clean past: a path, bytes, a file object, a PIL image, an
        array or tensor with or without a frame axis, or a list of frames (`streamgen.inputs`). A clip is resampled
        to the stream's fps and only its last `max_context_frames` are read; an image's first frame is used.
        `progress(seconds read, seconds to read)` follows the reading of a file. `session.context_frames`, what
        is shown for that past, is the VAE's reconstruction of it, or with `keep_input` the input frames themselves
        (resized): the reconstruction is what the model continues, the input is what its owner recognises.

        Unset options take the model's stream config; `window=None` keeps every chunk (the reference's behaviour).
        `target_fps` makes the step budget adaptive: each chunk gets the most steps that hold that rate, starting
        from `steps` (`streamgen.budget`). Every argument is checked here, before any work.
        """
        config = self._config(steps, height, width, window, sink, guidance_scale)
        if target_fps is not None:
            target_fps = inputs.real(target_fps, "target_fps", low=1e-3)
        budget = StepController(target_fps, steps=config.steps) if target_fps is not None else None
        seed = None if seed is None else inputs.integer(seed, "seed", 0, 2**64 - 1)
        negative_prompt = inputs.text(negative_prompt, "negative_prompt")
        self._check_prompt(prompt, prompt_embeds)  # before any reading: a typo costs nothing
        if image is not None and video is not None:
            raise ValueError("give an image or a video to extend, not both")
        if not isinstance(keep_input, bool):
            raise TypeError(f"keep_input must be True or False, got {keep_input!r:.40}")
        context = None
        if image is not None or video is not None:
            context = self._prepare(image, video, config, max_context_frames, progress)
        return Session(self, config, prompt, prompt_embeds, negative_prompt, seed, context, budget, keep_input)

    def prepare(
        self,
        image=None,
        video=None,
        *,
        height: int | None = None,
        width: int | None = None,
        max_context_frames: int = inputs.DEFAULT_CONTEXT_FRAMES,
        progress: media.Progress | None = None,
    ) -> "Extension":
        """Read and VAE-encode an image or clip to extend, for a `start_session(image=...)` or `(video=...)` of
        the same size: the costly part of opening such a session, done beforehand (a server does it on its upload
        threads, while other streams generate). Arguments as `start_session`'s."""
        if (image is None) == (video is None):
            raise ValueError("give an image or a video to prepare")
        config = self._config(None, height, width, _MODEL_DEFAULT, None, None)
        return self._prepare(image, video, config, max_context_frames, progress)

    def _prepare(self, image, video, config: StreamConfig, max_context_frames, progress) -> "Extension":
        name, source = ("image", image) if image is not None else ("video", video)
        if isinstance(source, Extension):
            if source.reconstruction.shape[1:3] != (config.height, config.width):
                size = source.reconstruction.shape[1:3]
                raise ValueError(f"{name} was prepared at {size}, not {config.height}x{config.width}")
            return source
        clip = inputs.read(
            source, name, height=config.height, width=config.width, fps=config.fps,
            max_frames=inputs.integer(max_context_frames, "max_context_frames", 1), first=image is not None,
            progress=progress,
        )  # fmt: skip
        frames = media.trim_to_clip_length(clip.frames, self.latent_scale[0])  # the counts the VAE encodes
        clip = dataclasses.replace(clip, frames=frames)
        with self._encoding:
            latents = encode_video(self.vae, clip.frames)
        decoder = StreamingDecoder(self.vae)
        reconstruction = to_uint8_frames(decoder.decode(latents).float())  # chunk by chunk would give the same
        return Extension(clip, latents, reconstruction, decoder)

    def _config(self, steps, height, width, window, sink, guidance_scale) -> StreamConfig:
        """The model's stream config with the caller's changes, each checked and named in its error."""
        changes: dict = {}
        if steps is not None:
            changes["steps"] = check_steps(inputs.integer(steps, "steps", 1))
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                changes[name] = inputs.integer(value, name, multiple)
                if changes[name] % multiple:
                    raise ValueError(
                        f"{name} must be a multiple of {multiple} (the VAE's stride times the compressed patch), "
                        f"got {changes[name]}"
                    )
        longest = self.transformer.rope.max_seq_len // self.config.chunk_frames  # chunks the RoPE table holds
        if window is not _MODEL_DEFAULT:
            changes["window"] = None if window is None else inputs.integer(window, "window", 1, longest)
        if sink is not None:
            changes["sink"] = inputs.integer(sink, "sink", 0, longest)
        if guidance_scale is not None:
            changes["guidance_scale"] = inputs.real(guidance_scale, "guidance_scale", low=1.0)
        return self.config.replace(**changes)

    def _check_prompt(self, prompt: str | None, prompt_embeds) -> torch.Tensor | None:
        """Exactly one of a prompt (text) or its embeddings (finite, `(1, tokens, text_dim)`); the embeddings as a
        tensor."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt or prompt_embeds")
        if prompt is not None:
            inputs.text(prompt, "prompt")
            return None
        embeds = inputs.tensor(prompt_embeds, "prompt_embeds", dims=3)
        dim = self.transformer.config.text_dim
        if embeds.shape[0] != 1 or embeds.shape[2] != dim or embeds.shape[1] == 0:
            raise ValueError(f"prompt_embeds must have shape (1, tokens, {dim}), got {tuple(embeds.shape)}")
        return embeds

    @property
    def size_multiple(self) -> int:
        """Stream heights and widths are multiples of this: the VAE's spatial stride times the transformer's
        compressed patch (older chunks are cached at that coarser grid)."""
        patch = self.engine.config.compressed_patch_size
        return self.latent_scale[1] * math.lcm(patch[1], patch[2])

    def next_chunks(self, sessions: list["Session"], output_type: str = "np") -> list:
        """The next chunk of each session, denoised in one batched transformer call per step (`engine.batch`),
        then cached and decoded per session. Each gets what its own `next_chunk()` would have given it."""
        first = [session.chunk_index == 0 for session in sessions]
        plans = [session._begin(None, None, output_type) for session in sessions]
        latents, seconds, shares = self.denoise(sessions, plans)
        outputs = []
        for session, z, (steps, _), initial, share in zip(sessions, latents, plans, first, shares):
            timing = session._commit(z, seconds)
            outputs.append(session._decode(z, steps, timing, output_type))
            session._account(timing, steps, share, initial)
        return outputs

    def denoise(
        self, sessions: list["Session"], plans: list[tuple[int, torch.Tensor]]
    ) -> tuple[list, float, list[float]]:
        """One batched denoise of each session's next chunk from its `(steps, noise)` plan (`Session._begin`):
        the chunks' latents, the seconds the call took (every session waited all of them), and each session's
        share of them (`batch_shares`)."""
        if len(set(map(id, sessions))) != len(sessions):
            raise ValueError("a session can contribute one chunk to a batch")
        start = time.perf_counter()
        requests = [DenoiseRequest(s.cache, noise, s.text, steps) for s, (steps, noise) in zip(sessions, plans)]
        latents = denoise_batch(self.engine, requests)
        seconds = _lap(start, self.device)
        return latents, seconds, batch_shares(seconds, [steps for steps, _ in plans])


@dataclass
class Extension:
    """An image or clip made ready to extend (`StreamingPipeline.prepare`): the frames used, their latents, and
    the VAE's reconstruction of them with the decoder state that follows it. This VAE work is most of what opening
    a session that extends something costs."""

    clip: media.Clip  # the frames used (1 + 4k, fitted) and what they came from
    latents: torch.Tensor  # (1, F, C, h, w), normalised, on the VAE's device
    reconstruction: np.ndarray  # uint8 (T, H, W, 3): what the stream continues, as the VAE decodes it
    decoder: StreamingDecoder | None  # decoded past the reconstruction: the stream's decoder from there on


class Session:
    """One endless stream: call `next_chunk()` forever; memory stays bounded by the cache window."""

    def __init__(
        self,
        pipe: StreamingPipeline,
        config: StreamConfig,
        prompt: str | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt: str,
        seed: int | None,
        context: "Extension | None",
        budget: StepController | None = None,
        keep_input: bool = False,
    ) -> None:
        self.pipe, self.config = pipe, config
        self.negative_prompt = negative_prompt
        self.text = self._condition(prompt, prompt_embeds)
        self.prompt = prompt
        self.transition: Transition | None = None  # a prompt change being blended in, or that the last chunk ended
        self.seed = int(seed) if seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)
        t_scale, s_scale = pipe.latent_scale
        self.latent_size = (config.height // s_scale, config.width // s_scale)
        policy = SinkWindow(config.sink, config.window)
        self.cache = pipe.engine.new_cache(self.latent_size, config.max_chunk_frames, policy)
        self.decoder = StreamingDecoder(pipe.vae)
        self.chunk_index = 0
        self.frames_generated = 0
        self.timing = ChunkTiming()
        self.budget = budget  # None: fixed steps (config.steps unless a chunk asks for others)
        self.last_steps: int | None = None  # steps the latest chunk took
        self._usage_seen = (pipe.usage.busy, pipe.usage.chunks)  # the device's usage after this session's last chunk
        self.closed = False
        self.context_frames: np.ndarray | None = None  # what is shown of the image/video extended (see start_session)
        self.context: media.Clip | None = None  # what was extended: the fitted input frames, and from what
        if context is not None:
            self._extend(context, keep_input)

    # -- public API ----------------------------------------------------------------------------------------
    def next_chunk(self, steps: int | None = None, noise: torch.Tensor | None = None, output_type: str = "np"):
        """Denoise, cache and decode the next chunk. Returns uint8 `(frames, H, W, 3)` ("np"), RGB in [-1, 1]
        `(1, 3, frames, H, W)` ("pt") or its latents `(1, F, C, h, w)` ("latent": not decoded, so a stream is
        either all latents or all frames). `steps=None` takes the adaptive budget's choice, else the config's."""
        first = self.chunk_index == 0
        steps, noise = self._begin(steps, noise, output_type)
        start = time.perf_counter()
        latents = self.pipe.engine.denoise(self.cache, noise, self.text, steps)
        seconds = _lap(start, self.pipe.device)
        timing = self._commit(latents, seconds)
        result = self._decode(latents, steps, timing, output_type)
        self._account(timing, steps, seconds, first)
        return result

    def set_prompt(
        self, prompt: str | None = None, *, prompt_embeds: torch.Tensor | None = None, transition: int = 0
    ) -> None:
        """Later chunks follow the new prompt. `transition=0` cuts to it, re-encoding the cached context under it so
        the cut is smooth (LongLive's re-cache); `transition=k` blends the text condition from the current one to the
        new one over the next k chunks (`Transition`), as Scope's and Krea's servers do, with no re-cache."""
        self._check_open()
        if isinstance(transition, bool) or not isinstance(transition, int) or transition < 0:
            raise ValueError(f"transition must be a whole number of chunks >= 0, got {transition!r}")
        target = self._condition(prompt, prompt_embeds)
        if transition and target.embeds.shape != self.text.embeds.shape:
            raise ValueError("a transition needs prompt embeddings of the current prompt's shape")
        if transition:
            self.transition = Transition(self.text, target, self.prompt, prompt, transition)
        else:
            self.transition, self.text = None, target
            self.pipe.engine.recache(self.cache, self.text)
        self.prompt = prompt

    def close(self) -> None:
        """Free the cache and decoder state now (not when the garbage collector gets to it)."""
        if self.closed:
            return
        self.closed = True
        self.cache.clear()
        self.decoder.close()
        self.context_frames = self.context = None

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes + self.decoder.nbytes

    @property
    def fps(self) -> int:
        return self.config.fps

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------------
    def _begin(self, steps: int | None, noise: torch.Tensor | None, output_type: str) -> tuple[int, torch.Tensor]:
        """The next chunk's step count and initial noise, on the model's device."""
        self._check_open()
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        engine = self.pipe.engine
        frames = self.config.chunk_size(self.chunk_index)
        if steps is None:
            steps = self.budget.choose(self._video_frames(frames)) if self.budget else self.config.steps
        steps = check_steps(steps)
        if self.transition is not None and self.transition.done == self.transition.chunks:
            self.transition = None  # the previous chunk ended it
        if self.transition is not None:
            self.text = self.transition.advance()
        shape = (1, frames, engine.config.in_channels, *self.latent_size)
        if noise is None:
            noise = torch.randn(shape, generator=self.generator)
        else:
            noise = inputs.tensor(noise, f"noise for chunk {self.chunk_index}", shape)
        return steps, noise.to(engine.device, engine.dtype)

    def _commit(self, latents: torch.Tensor, denoise: float) -> ChunkTiming:
        """Fold a denoised chunk into the cache; from here on the stream can denoise its next chunk. `denoise`:
        seconds this session waited for its steps. Returns the chunk's timing so far."""
        engine = self.pipe.engine
        start = time.perf_counter()
        engine.commit(self.cache, latents, self.text)
        self.chunk_index += 1
        return ChunkTiming(transformer=denoise, cache=_lap(start, engine.device))

    def _decode(self, latents: torch.Tensor, steps: int, timing: ChunkTiming, output_type: str):
        """Decode a committed chunk, or its next latent frames (its decode time adds up in `timing`). A stream's chunks
        are decoded in order, possibly while its next one denoises (the decoder's state is its own)."""
        result = latents
        if output_type != "latent":
            start = time.perf_counter()
            video = self.decoder.decode(latents.to(self.pipe.vae.dtype))
            result = video if output_type == "pt" else to_uint8_frames(video.float())
            timing.decode += _lap(start, self.pipe.device)
            self.frames_generated += video.shape[2]
        self.timing, self.last_steps = timing, steps
        return result

    def _account(self, timing: ChunkTiming, steps: int, device_share: float, first: bool) -> None:
        """Record a finished chunk's device time; tell the adaptive budget what it and the other sessions cost.
        `device_share`: this session's part of its denoising time, less than `timing.transformer` when its steps
        ran batched with other sessions'; the rest of `timing` is its own. `first`: the stream's first chunk, which
        is shorter and has no deadline, so the budget does not learn from it."""
        usage = self.pipe.usage
        busy = device_share + timing.total - timing.transformer
        usage.record(busy)
        (seen_busy, seen_chunks), self._usage_seen = self._usage_seen, (usage.busy, usage.chunks)
        if self.budget is not None and not first:
            others = max(0.0, usage.busy - seen_busy - busy)
            self.budget.observe(ChunkReport(steps, device_share, busy, others, usage.chunks - seen_chunks))

    def _video_frames(self, latent_frames: int) -> int:
        """Video frames that `latent_frames` decode to at this point of the stream (the first latent gives one)."""
        scale = self.pipe.latent_scale[0]
        return latent_frames * scale - (scale - 1 if self.chunk_index == 0 else 0)

    def _condition(self, prompt: str | None, prompt_embeds: torch.Tensor | None) -> TextCondition:
        prompt_embeds = self.pipe._check_prompt(prompt, prompt_embeds)
        pipe = self.pipe
        embeds = pipe.encode_prompt(prompt) if prompt is not None else prompt_embeds.to(pipe.device, pipe.engine.dtype)
        negative = pipe.encode_prompt(self.negative_prompt) if self.config.guidance_scale > 1 else None
        if negative is not None and negative.shape != embeds.shape:
            raise ValueError("with guidance, prompt_embeds must have the text encoder's sequence length")
        return TextCondition(embeds, negative, self.config.guidance_scale)

    def _extend(self, extension: "Extension", keep_input: bool) -> None:
        """Make a prepared image or clip the clean past the stream continues from (I2V / V2V): its latents are
        cached chunk by chunk, and the decoder that reconstructed it decodes the stream from there."""
        if extension.decoder is None:
            raise ValueError("a prepared image or clip extends one session only")
        pipe = self.pipe
        self.decoder.close()
        self.decoder, extension.decoder = extension.decoder, None
        self.context = extension.clip
        latents = extension.latents.to(pipe.device, pipe.engine.dtype)
        start = 0
        while start < latents.shape[1]:
            size = self.config.chunk_size(self.chunk_index)
            pipe.engine.commit(self.cache, latents[:, start : start + size], self.text)
            self.chunk_index += 1
            start += size
        self.context_frames = extension.clip.frames if keep_input else extension.reconstruction

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this session is closed")


def batch_shares(seconds: float, steps: list[int]) -> list[float]:
    """Each chunk's part of a batched denoise that took `seconds`: every step's forward (taken as equally long) is
    split among the chunks it computed, so a chunk with a small budget is not charged for another's larger one.
    What an adaptive budget learns its cost per step from; the parts add up to `seconds`."""
    forward = seconds / max(steps)
    return [forward * sum(1 / sum(s > k for s in steps) for k in range(n)) for n in steps]


def _lap(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
