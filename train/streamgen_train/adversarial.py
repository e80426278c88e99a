"""An adversarial term for the VAE's decoder: a per-frame patch discriminator and its hinge losses.

A decoder trained by regression alone draws the average of what its latent leaves uncertain: where the latent does
not settle whether a small object is a triangle or a circle, L1 + L2 draw a round blob, which is neither (the
shipped decoder turns every small triangle into one, docs/training.md, session 16). A discriminator that tells
real frames from decoded ones makes the decoder commit to a sharp shape, as Wan's VAE and the tiny streaming
decoders are trained. The weight of the term is balanced against the reconstruction's gradient at the decoder's
last layer (VQGAN's adaptive weight), so one setting holds however the two losses scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Real/decoded logits per ~26-pixel patch of each frame: about the size of the world's largest object."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """`(B, 3, T, H, W)` clips in [-1, 1] -> `(B * T, 1, H / 4, W / 4)` logits."""
        return self.net(video.transpose(1, 2).flatten(0, 1))


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator's logits on real and (detached) decoded frames."""
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The adversarial term's weight: the ratio of the two losses' gradient norms at `last` (the decoder's output
    layer), so the discriminator can sharpen the frames but never outweigh their fidelity."""
    g_rec = torch.autograd.grad(reconstruction, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(max=1e4).detach()
