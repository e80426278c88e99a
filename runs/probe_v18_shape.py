"""Issue 11, session 18: shape through a VAE's round trip, matched by position rather than colour.

`runs/probe_v16_shape.py` and the scorer find a round trip's object by its colour, so a VAE that shifts hues (a 4x
VAE early in training) reads as losing shapes it keeps. Here each object the scorer finds in the truth is matched to
the round trip's detection whose track is nearest (mean centroid distance over the frames both are present), and
its shape compared, per size.

    OMP_NUM_THREADS=1 python runs/probe_v18_shape.py VAE_DIR [VAE_DIR ...] [--prompts 64]
"""

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from quality import round_trip  # noqa: E402
from streamgen_train.data import EVAL_SEED  # noqa: E402
from streamgen_train.world.scene import VideoWorld  # noqa: E402
from streamgen_train.world.scorer import analyse  # noqa: E402


def distance(a: np.ndarray, b: np.ndarray) -> float:
    both = ~(np.isnan(a).any(1) | np.isnan(b).any(1))
    return float(np.linalg.norm(a[both] - b[both], axis=1).mean()) if both.any() else np.inf


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("vaes", nargs="+")
    p.add_argument("--prompts", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    world = VideoWorld()
    clips = [world.clip((EVAL_SEED, i), 49) for i in range(a.prompts)]
    truths = [analyse(t) for t, _ in clips]
    for path in a.vaes:
        vae = AutoencoderKLWan.from_pretrained(path).eval()
        kept = collections.Counter()
        for (truth, _), found in zip(clips, truths):
            back = analyse(round_trip(vae, truth))
            for d in found:
                near = min(back, key=lambda b: distance(d.track, b.track), default=None)
                ok = near is not None and distance(d.track, near.track) < 6  # pixels
                kept[d.size, "found"] += ok
                kept[d.size, "shape"] += ok and near.shape == d.shape
                kept[d.size, "all"] += 1
        print(path, {s: f"found {kept[s, 'found']}/{kept[s, 'all']}, shape kept {kept[s, 'shape']}/{kept[s, 'all']}"
                     for s in ("small", "large")})


if __name__ == "__main__":
    main()
