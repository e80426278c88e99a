"""Issue 11, session 16: where the objects' shape is lost, the encoder or the decoder.

For each VAE directory given (or `pool`: 8x8 average pooling of the frames, a fixed encoder with no decoder):

(a) the round trip's shape per size: world clips (held-out seeds, 49 frames) encoded and decoded as `quality.py`
    does, each captioned object's shape as the scorer reads it from the truth and from the round trip;
(b) a probe of the latents: one-object clips (17 frames), the 4x4 latent patch around the object in latent frame 3
    (video frames 9-12), a linear and an MLP classifier of its shape trained on 3/4 of the clips, accuracy on the
    rest, for small and large objects.

    OMP_NUM_THREADS=1 python runs/probe_v16_shape.py streamgen/assets/default-model/vae pool [--clips 2000]
"""

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from quality import round_trip  # noqa: E402
from streamgen_train.data import EVAL_SEED  # noqa: E402
from streamgen_train.world.grammar import SHAPES, parse_caption  # noqa: E402
from streamgen_train.world.scene import VideoWorld, render, sample_scene  # noqa: E402
from streamgen_train.world.scorer import analyse  # noqa: E402

PROBE_FRAMES, PROBE_LATENT = 17, 3  # latent frame 3 holds video frames 9-12


def round_trip_shapes(vae: AutoencoderKLWan, prompts: int) -> collections.Counter:
    world, counts = VideoWorld(), collections.Counter()
    for p in range(prompts):
        truth, caption = world.clip((EVAL_SEED, p), 49)
        back = {d.colour: d.shape for d in analyse(round_trip(vae, truth))}
        for obj in parse_caption(caption).objects:
            counts[obj.size, obj.shape, back.get(obj.colour)] += 1
    return counts


@torch.no_grad()
def latent_patches(vae: AutoencoderKLWan | None, clips: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    features, labels, small = [], [], []
    for s in range(clips):
        scene = sample_scene(np.random.default_rng((77, s)), num_objects=1)
        frames = render(scene, PROBE_FRAMES)
        x = torch.from_numpy(frames).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
        if vae is None:  # 4 frames x 3 colours, each averaged over the VAE's 8x8 pixels
            window = x[0, :, 4 * PROBE_LATENT - 3 : 4 * PROBE_LATENT + 1].reshape(1, 12, *x.shape[-2:])
            latent = F.avg_pool2d(window, 8)[0]
        else:
            latent = vae.encode(x).latent_dist.mode()[0, :, PROBE_LATENT]
        background = np.median(frames[10].reshape(-1, 3), axis=0)
        mask = np.abs(frames[9:13].astype(float) - background).sum(-1).mean(0) > 60
        if mask.sum() < 4:
            continue
        ys, xs = np.nonzero(mask)
        iy, ix = (int(round(c.mean() / 8 - 0.5)) + 2 for c in (ys, xs))
        patch = F.pad(latent, (2, 2, 2, 2))[:, iy - 2 : iy + 2, ix - 2 : ix + 2]
        features.append(patch.flatten())
        labels.append(SHAPES.index(scene.objects[0].shape))
        small.append(scene.objects[0].spec.size == "small")
    x = torch.stack(features)
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6), torch.tensor(labels), np.array(small)


def probe(x: torch.Tensor, y: torch.Tensor, small: np.ndarray, hidden: int) -> tuple[float, float]:
    torch.manual_seed(0)
    train = torch.arange(len(y)) < int(0.75 * len(y))
    model = (torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 3))
             if hidden else torch.nn.Linear(x.shape[1], 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(1500):
        loss = F.cross_entropy(model(x[train]), y[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    right = (model(x[~train]).argmax(1) == y[~train]).numpy()
    held_small = small[~train.numpy()]
    return float(right[held_small].mean()), float(right[~held_small].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vaes", nargs="+", help="VAE directories, or 'pool'")
    parser.add_argument("--clips", type=int, default=2000, help="one-object clips for the latent probe")
    parser.add_argument("--prompts", type=int, default=24, help="world clips for the round trip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.vaes:
        vae = None if name == "pool" else AutoencoderKLWan.from_pretrained(name).eval()
        if vae is not None:
            counts = round_trip_shapes(vae, args.prompts)
            for size in ("small", "large"):
                for shape in SHAPES:
                    seen = {k[2]: n for k, n in counts.items() if k[:2] == (size, shape)}
                    print(f"{name}: round trip of {size} {shape}s read as {seen}")
        x, y, small = latent_patches(vae, args.clips)
        for kind, hidden in (("linear", 0), ("MLP", 256)):
            s, large = probe(x, y, small, hidden)
            print(f"{name}: {kind} probe of the latent patch, held-out shape accuracy small {s:.2f} large {large:.2f}")


if __name__ == "__main__":
    main()
