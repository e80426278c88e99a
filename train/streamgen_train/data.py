"""Training data from the procedural world: pixel clips for the VAE, a cached latent set for the transformers.

Clips are a pure function of (stage, step), so resuming needs no data state. The transformers train on a fixed set
of clips encoded once by the trained VAE: encoding on the fly would cost more than the toy transformer's step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from tqdm import tqdm

from streamgen.config import StreamConfig
from streamgen.vae import encode_video
from . import footage
from .world.scene import VideoWorld

# The stream's chunking (first an image, then clips), the stream config's, over a 13-latent-frame training clip.
CHUNKS = tuple(StreamConfig().partition(5))
# World seeds apart from the training steps' (seed = step index), so statistics and the latent set are held apart,
# and the benchmarks' prompts come from seeds no stage draws.
STATS_SEED, LATENT_SEED, EVAL_SEED = 10**8, 10**8 + 1, 10**9
# One clip in FOOTAGE_EVERY is a real-image clip (`footage`), captioned "": the VAE must represent footage, and the
# transformers learn to continue an uploaded clip without a prompt. The VAE sees more of it than the transformers,
# whose prompts are the world's.
VAE_FOOTAGE_EVERY, LATENT_FOOTAGE_EVERY = 3, 8


def clip(world: VideoWorld, seed: int, index: int, frames: int, footage_every: int) -> tuple[np.ndarray, str]:
    """Clip `index` of a set seeded by `seed`: world clip `(seed, index)`, or every `footage_every`-th a footage
    clip with the empty caption. uint8 `(T, H, W, 3)`."""
    if index % footage_every == footage_every - 1:
        return footage.clip((seed, index), frames, world.height, world.width), ""
    return world.clip((seed, index), frames)


def pixel_clips(
    world: VideoWorld, seed: int, batch: int, frames: int, footage_every: int = VAE_FOOTAGE_EVERY
) -> tuple[torch.Tensor, list[str]]:
    """`(B, 3, T, H, W)` in [-1, 1] (the VAE's layout and range) and the captions. Batches are numbered on from
    each other (clip `seed * batch + i`), so footage keeps its share whatever the batch size."""
    clips = [clip(world, seed, seed * batch + i, frames, footage_every) for i in range(batch)]
    x = torch.from_numpy(np.stack([c[0] for c in clips])).float().div(127.5).sub(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous(), [c[1] for c in clips]


@torch.no_grad()
def set_latent_stats(
    vae: AutoencoderKLWan, world: VideoWorld, clips: int = 32, frames: int = 17
) -> None:
    """Write per-channel `latents_mean`/`latents_std` of the posterior mean into the VAE's config, so normalised
    latents are about unit variance: the flow-matching noise scale every later stage assumes."""
    x, _ = pixel_clips(world, STATS_SEED, clips, frames, LATENT_FOOTAGE_EVERY)
    mu = vae.encode(x.to(vae.device)).latent_dist.mean
    mean = mu.mean(dim=(0, 2, 3, 4))
    std = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())


@dataclass
class LatentSet:
    """Normalised clip latents `(N, F, C, h, w)` (the transformer's layout) with their captions."""

    latents: torch.Tensor
    captions: list[str]

    def batch(
        self, step: int, size: int, frames: int, salt: int = 0
    ) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(
            len(self.captions),
            (size,),
            generator=torch.Generator().manual_seed(salt * 7919 + step),
        )
        return self.latents[index, :frames], [self.captions[i] for i in index.tolist()]

    @classmethod
    def build(
        cls,
        path: Path,
        vae: AutoencoderKLWan,
        world: VideoWorld,
        clips: int,
        frames: int,
    ) -> LatentSet:
        """Encode `clips` world clips of `frames` latent frames once and cache them at `path`. A cache with fewer
        clips is extended (clip `i` is the same whatever the set's size), so a run can grow its data set."""
        cached, captions = None, []
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved["latents"].shape[1] >= frames:
                cached, captions = saved["latents"][:clips, :frames], saved["captions"][:clips]
        if len(captions) == clips:
            return cls(cached, captions)
        new = []
        for i in tqdm(range(len(captions), clips), desc="encoding clips", unit="clip"):
            video, caption = clip(world, LATENT_SEED, i, 1 + 4 * (frames - 1), LATENT_FOOTAGE_EVERY)
            new.append(encode_video(vae, np.ascontiguousarray(video)).float().cpu()[0])
            captions.append(caption)
        latents = torch.stack(new) if cached is None else torch.cat([cached, torch.stack(new)])
        torch.save({"latents": latents, "captions": captions}, path)
        return cls(latents, captions)
