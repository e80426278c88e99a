"""RoPE frequencies for explicit frame positions.

diffusers builds frequencies for frames `0..N-1` of one finite video. A stream needs them for whatever frames the
context holds now: positions are assigned compactly (context frames first, then the chunk), so the largest
position is bounded by the window, never by the stream's length. With an unbounded window the positions are the
absolute frame indices, exactly the reference's.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from ..diffusers_adapter import AnyFlowCausalRotaryPosEmbed, rope_axis_tables


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on `(B, heads, L, dim)` with real `(cos, sin)` tables from `rope_frequencies`.

    The same rotation as diffusers' `apply_rotary_emb` (interleaved pairs), in float32 real arithmetic instead of
    complex128: GPUs run float64 slowly, and `torch.compile`'s code generator falls back to eager kernels for
    complex arithmetic instead of fusing it.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = freqs.unbind(-1)
    even, odd = pairs.unbind(-1)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)


def rope_frequencies(
    rope: AnyFlowCausalRotaryPosEmbed,
    positions: torch.Tensor,
    grid: tuple[int, int],
    compressed: bool,
    device: torch.device,
) -> torch.Tensor:
    """`(cos, sin)` tables `(1, 1, len(positions) * h * w, dim / 2, 2)`, float32, for tokens of the given frame
    positions (`rotate` applies them).

    `grid` is the token grid of one frame (full: latent / 2, compressed: latent / 4); compressed frequencies are
    complex-average-pooled over the patch as diffusers does, so both resolutions agree on where a pixel is.
    """
    if len(positions) and int(positions.max()) >= rope.max_seq_len:
        raise ValueError(
            f"frame position {int(positions.max())} is past the model's RoPE table ({rope.max_seq_len} frames): "
            "use a finite cache window for long streams"
        )
    parts = _axis_tables(rope, device, compressed)
    h, w = grid
    frames = len(positions)
    f = parts[0][positions.to(device)].view(frames, 1, 1, -1).expand(frames, h, w, -1)
    y = parts[1][:h].view(1, h, 1, -1).expand(frames, h, w, -1)
    x = parts[2][:w].view(1, 1, w, -1).expand(frames, h, w, -1)
    angles = torch.cat([f, y, x], dim=-1).flatten(0, 2)[None, None]
    return torch.view_as_real(angles).float()


_axis_tables = lru_cache(maxsize=16)(rope_axis_tables)  # per (rope, device, compressed): built once
