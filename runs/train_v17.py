"""Issue 11, session 17: can the shipped VAE's latents be made to carry small shapes?

Session 16 found the shape of a small object lost in the latent space (a probe of the latents reads it about as
well as 8x8 pooling of the frames does). Here the shipped VAE is fine-tuned, encoder and decoder, with the vae
stage's loss plus a shape loss: a linear 1x3x3 head on the posterior mean must tell, at the latent pixel of
every object's centre, that object's shape (the world's own geometry gives the labels). The head is dropped afterwards;
at --shape-weight 0 it still learns, on detached latents: the control arm, with a running linear probe.

    OMP_NUM_THREADS=1 python runs/train_v17.py runs/v17-1.0 --shape-weight 1.0 --minutes 75
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from streamgen_train import stages
from streamgen_train.data import VAE_FOOTAGE_EVERY, pixel_clips, set_latent_stats
from streamgen_train.loop import Run, generator, optimize
from streamgen_train.world.grammar import SHAPES
from streamgen_train.world.scene import Scene, VideoWorld, coverage, render

SHIPPED = Path("streamgen/assets/default-model/vae")
# Each step's two VAE clips hold one to four objects, too few kinds for a classifier: the shape loss also sees this
# many whole-frame world clips of SHAPE_FRAMES frames through the encoder alone (a quarter of the VAE's cost).
SHAPE_CLIPS, SHAPE_FRAMES, SHAPE_SEED = 6, 17, 10**7 + 10**6


def shape_labels(world: VideoWorld, scenes: list[Scene | None], frames: int) -> torch.Tensor:
    """(B, latent frames, h, w): at the latent pixel of each object's centre in each latent frame, its shape index
    (a 3x3 latent neighbourhood, 24 pixels, then holds the whole object); -100 elsewhere and for footage (None).
    Inside a large object a latent pixel cannot tell its shape, so only centres are labelled."""
    out = torch.full((len(scenes), 1 + (frames - 1) // 4, world.height // 8, world.width // 8), -100)
    for i, scene in enumerate(scenes):
        if scene is None:
            continue
        cov = coverage(scene, frames, world.height, world.width)  # (K, T, H, W)
        groups = [cov[:, :1].mean(1)] + [cov[:, 1 + 4 * j : 5 + 4 * j].mean(1) for j in range((frames - 1) // 4)]
        for k, obj in enumerate(scene.objects):
            for t, frame in enumerate(np.stack(groups, 1)[k]):  # (H, W) coverage over the latent frame's frames
                if frame.sum() < 1:
                    continue
                ys, xs = np.mgrid[: frame.shape[0], : frame.shape[1]]
                cy, cx = (int((c * frame).sum() / frame.sum()) // 8 for c in (ys, xs))
                out[i, t, cy, cx] = SHAPES.index(obj.shape)  # drawn back to front: the front object wins
    return out


def stage_scenes(world: VideoWorld, seed: int, batch: int) -> list[Scene | None]:
    """The scenes of `pixel_clips(world, seed, batch, ...)`'s clips (None: footage)."""
    indices = [seed * batch + i for i in range(batch)]
    return [None if k % VAE_FOOTAGE_EVERY == VAE_FOOTAGE_EVERY - 1 else world.scene((seed, k)) for k in indices]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--shape-weight", type=float, default=1.0)
    parser.add_argument("--minutes", type=float, default=75)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = stages.Recipe(root=args.root)
    world = recipe.world
    vae = AutoencoderKLWan.from_pretrained(SHIPPED)
    head = torch.nn.Conv3d(vae.config.z_dim, len(SHAPES), (1, 3, 3), padding=(0, 1, 1))
    # The head starts from nothing and must keep up with the encoder: a rate of its own.
    groups = [{"params": vae.parameters()}, {"params": head.parameters(), "lr": args.head_lr}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    batch, frames, crop = recipe.batch // 4, stages.VAE_CLIP_FRAMES, stages.VAE_CROP

    def step(i: int) -> dict[str, float]:
        x, _ = pixel_clips(world, i, batch, frames)
        labels = stages._crop(shape_labels(world, stage_scenes(world, i, batch), frames)[:, None], crop // 8,
                              generator(i, 5), grid=1)[:, 0]
        x = stages._crop(x, crop, generator(i, 5))
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator(i, 0))
        reconstruction = stages._reconstruction_loss(vae, z, x)
        kl = posterior.kl().mean() / z[0].numel()
        scenes = [world.scene((SHAPE_SEED + i, k)) for k in range(SHAPE_CLIPS)]
        extra = torch.from_numpy(np.stack([render(sc, SHAPE_FRAMES) for sc in scenes])).float().div(127.5).sub(1)
        means = (posterior.mean, vae.encode(extra.permute(0, 4, 1, 2, 3)).latent_dist.mean)
        # The head always learns (at weight 0 it is a running linear probe); the encoder gets `shape_weight` of its
        # gradient.
        logits = torch.cat([head(m.detach() + args.shape_weight * (m - m.detach())).permute(0, 2, 3, 4, 1).flatten(0, 3)
                            for m in means])
        labels = torch.cat([labels.flatten(), shape_labels(world, scenes, SHAPE_FRAMES).flatten()])
        known = labels >= 0
        shape = F.cross_entropy(logits[known], labels[known])
        accuracy = (logits[known].argmax(1) == labels[known]).float().mean()
        optimize(optimizer, reconstruction + 1e-4 * kl + shape)
        return {"rec": reconstruction.item(), "kl": kl.item(), "shape": shape.item(), "acc": accuracy.item()}

    run = Run(args.root, "vae")
    run.train(10**6, {"vae": vae, "head": head}, {"vae": optimizer}, step, minutes=args.minutes)
    set_latent_stats(vae, world)
    vae.save_pretrained(run.final / "vae")


if __name__ == "__main__":
    sys.exit(main())
