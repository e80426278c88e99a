"""Session 19: does the patch-4 teacher leave noise outside the data's patch subspace?

At 4x with patch 4 a token carries 16 channels x 4x4 = 256 latent values through a 128-wide transformer; the world's
latent patches live in ~32 of those dimensions, but the noise fills all 256. This samples a teacher's streams, measures
their energy outside the data's top-k patch subspace against the data's own, and scores them decoded as sampled and
projected onto that subspace.

  python runs/probe_v19_rank.py RUN [PROMPTS] [STEPS]
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
import quality as Q  # noqa: E402
from streamgen.config import StreamConfig  # noqa: E402
from streamgen.engine import StreamingEngine, TextCondition  # noqa: E402
from streamgen.pipeline import StreamingPipeline  # noqa: E402
from streamgen_train import components as C  # noqa: E402
from streamgen_train.data import EVAL_SEED  # noqa: E402
from streamgen_train.world.scene import VideoWorld  # noqa: E402
from streamgen_train.world.scorer import semantic_score  # noqa: E402

P = 4


def patches(z: torch.Tensor) -> torch.Tensor:
    b, t, c, h, w = z.shape
    return z.reshape(b, t, c, h // P, P, w // P, P).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, c * P * P)


def unpatch(p: torch.Tensor, shape) -> torch.Tensor:
    b, t, c, h, w = shape
    return p.reshape(b, t, h // P, w // P, c, P, P).permute(0, 1, 4, 2, 5, 3, 6).reshape(shape)


def main() -> None:
    torch.set_num_threads(1)
    run, n, steps = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 16, int(sys.argv[3]) if len(sys.argv) > 3 else 4
    data = torch.load(run / "latents.pt", weights_only=True)["latents"][:512, 1:]
    dp = patches(data)
    mean = dp.mean(0)
    _, _, v = torch.linalg.svd((dp - mean)[::5], full_matrices=False)
    tok, enc, vae, teacher, _ = Q.load(run, [])
    engine = StreamingEngine(teacher, C.build_scheduler())
    pipe = StreamingPipeline(teacher, vae, C.build_scheduler(), enc, tok)
    world = VideoWorld(64, 64)
    captions = [world.clip((EVAL_SEED, p), 1)[1] for p in range(n)]
    text = torch.cat([pipe.encode_prompt(c) for c in captions])
    guided = TextCondition(text, pipe.encode_prompt("").expand_as(text), 2.0)
    gen = torch.Generator().manual_seed(0)
    sizes = Q.chunk_sizes(Q.CLIP_LATENT_FRAMES)
    noises = [torch.randn(n, f, 16, 16, 16, generator=gen) for f in sizes]
    z = Q.stream(engine, guided, noises, steps, StreamConfig().window)
    zp = patches(z[:, 1:]) - mean
    for k in (32, 64, 128):
        basis = v[:k]
        outside = lambda x: float(((x - (x @ basis.T) @ basis) ** 2).sum(1).mean() / (x**2).sum(1).mean())  # noqa: E731
        print(f"k={k}: energy outside the data's top-k patch subspace: data {outside(dp[::50] - mean):.4f}, "
              f"samples {outside(zp):.4f}")
    for k in (32, 64, 128):
        basis = v[:k]
        projected = z.clone()
        projected[:, 1:] = unpatch((zp @ basis.T) @ basis + mean, z[:, 1:].shape)
        scores = [semantic_score(f, c) for f, c in zip(Q.decode(vae, projected), captions)]
        print(f"k={k}: projected, semantic {np.mean(scores):.3f}")
    scores = [semantic_score(f, c) for f, c in zip(Q.decode(vae, z), captions)]
    print(f"as sampled ({steps} steps, guided 2): semantic {np.mean(scores):.3f}")


if __name__ == "__main__":
    main()
