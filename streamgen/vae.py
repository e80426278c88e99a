"""Streaming Wan-VAE decode and one-shot encode, bit-compatible with diffusers' AnyFlow-FAR pipeline.

`AutoencoderKLWan.decode` clears the decoder's causal feature cache on every call, so decoding a stream chunk by
chunk through it would restart the causal convolutions at every chunk (a visible seam, and 1 instead of 4 frames
for each chunk's first latent). `StreamingDecoder` drives the decoder exactly as `AutoencoderKLWan._decode` does,
one latent frame at a time, but owns the feature cache so it survives between chunks: decoding chunk by chunk
equals decoding the whole latent video at once.
"""

from __future__ import annotations

from types import TracebackType

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .diffusers_adapter import decode_latent_frame, decoder_cache, encode_posterior


def _stats(vae: AutoencoderKLWan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`latents_mean` and `1 / latents_std` as (1, C, 1, 1, 1) float32, built the way the pipeline builds them."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(device)
    inv_std = (1.0 / torch.tensor(vae.config.latents_std)).view(shape).to(device)
    return mean, inv_std


class StreamingDecoder:
    """Decodes one stream's latents chunk by chunk, keeping the Wan decoder's causal cache between chunks.

    One instance per stream: the cache holds the last frames' activations of that stream only. The first latent
    frame of the stream decodes to 1 video frame, every later one to 4 (the VAE's temporal stride).
    Spatial tiling (`vae.enable_tiling()`) is not applied: tiles would each need their own cache.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
        self._cache: list[torch.Tensor | str | None] | None = None
        self._shape: tuple[int, int, int] | None = None  # (batch, h, w) the cache was built for
        self.latent_frames = 0
        self._closed = False

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the stream's next latent frames.

        Args:
            latents: normalised latents `(B, F, C, h, w)`, the transformer's layout, continuing the stream.

        Returns:
            RGB in [-1, 1], `(B, 3, frames, H, W)` in the VAE's dtype; frames = 4F, or 4F - 3 for the first chunk.
        """
        if self._closed:
            raise RuntimeError("StreamingDecoder is closed")
        vae = self.vae
        if latents.ndim != 5 or latents.shape[2] != vae.config.z_dim or latents.shape[1] == 0:
            raise ValueError(
                f"latents must be (B, F>0, {vae.config.z_dim}, h, w) (frames second), got {tuple(latents.shape)}"
            )
        shape = (latents.shape[0], latents.shape[3], latents.shape[4])
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"(batch, h, w) changed mid-stream from {self._shape} to {shape}; call reset() first")
        if self._cache is None:
            self._cache = decoder_cache(vae)
        self._shape = shape

        # De-normalise exactly like AnyFlowFARPipeline.__call__ before `vae.decode`: in the VAE's dtype.
        z = latents.permute(0, 2, 1, 3, 4).to(device=vae.device, dtype=vae.dtype)
        mean, inv_std = _stats(vae, z.device)
        z = z / inv_std.to(z.dtype) + mean.to(z.dtype)

        x = vae.post_quant_conv(z)  # a 1x1x1 convolution: no temporal state, so per-chunk is exact
        outs = []
        for i in range(x.shape[2]):
            outs.append(decode_latent_frame(vae, x[:, :, i : i + 1], self._cache, first=self.latent_frames == 0))
            self.latent_frames += 1
        out = torch.cat(outs, 2)
        return out.clamp(-1.0, 1.0)

    @property
    def nbytes(self) -> int:
        """Bytes held by the causal feature cache (grows to a fixed size after the first two latent frames)."""
        return sum(t.numel() * t.element_size() for t in self._cache or () if isinstance(t, torch.Tensor))

    def reset(self) -> None:
        """Free the cache and start a new stream: the next latent frame is decoded as the stream's first."""
        self._cache = None
        self._shape = None
        self.latent_frames = 0

    def close(self) -> None:
        """Free the cache for good; later `decode` calls raise."""
        self.reset()
        self._closed = True

    def __enter__(self) -> StreamingDecoder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """`(1, 3, T, H, W)` video in [-1, 1] to `(T, H, W, 3)` uint8.

    Matches `VideoProcessor.postprocess_video(video, output_type="np")` (denormalise in the video's dtype, then
    float32) followed by diffusers' own float-to-uint8 conversion (`numpy_to_pil`: `* 255`, round), so frames equal
    the reference pipeline's.
    """
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"video must be (1, 3, T, H, W), got {tuple(video.shape)}")
    frames = (video[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1).cpu().float().numpy()
    return (frames * 255).round().astype(np.uint8)


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Encode a clip to normalised latents `(1, T_latent, C, h, w)`, as `AnyFlowFARPipeline.encode_video` does.

    Args:
        frames: uint8 `(T, H, W, 3)` or float `(T, 3, H, W)` in [0, 1], T = 1 + 4k, H and W multiples of the VAE's
            spatial factor (no resizing here: `streamgen.media.read_frames` sizes clips).

    Returns:
        The posterior mean, normalised with the VAE's `latents_mean`/`latents_std`, in the VAE's dtype;
        T_latent = 1 + k.
    """
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise ValueError(f"numpy frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        # VaeImageProcessor.pil_to_numpy's conversion.
        video = torch.from_numpy(frames.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    elif isinstance(frames, torch.Tensor):
        if not frames.is_floating_point() or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"tensor frames must be float (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        if frames.numel() and (frames.min() < 0 or frames.max() > 1):
            raise ValueError("tensor frames must lie in [0, 1]")
        video = frames
    else:
        raise ValueError(f"frames must be a numpy array or a torch tensor, got {type(frames).__name__}")
    t, _, h, w = video.shape
    stride = vae.config.scale_factor_temporal
    if t % stride != 1:
        raise ValueError(f"frame count must be 1 + {stride}k, got {t} (see streamgen.media.trim_to_clip_length)")
    factor = vae.config.scale_factor_spatial
    if h % factor or w % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {h}x{w}")

    # VaeImageProcessor.preprocess normalises to [-1, 1]; preprocess_video puts channels before frames.
    video = (2.0 * video - 1.0).permute(1, 0, 2, 3)[None].to(device=vae.device, dtype=vae.dtype)
    mu = torch.chunk(encode_posterior(vae, video), 2, dim=1)[0]
    mean, inv_std = _stats(vae, mu.device)
    latents = ((mu.float() - mean) * inv_std).to(mu)
    return latents.permute(0, 2, 1, 3, 4)
