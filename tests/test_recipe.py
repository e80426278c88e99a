"""The whole training recipe end to end on a tiny model, stage by stage as `streamgen train all` runs it: every
stage hands the next what it needs, and the export streams."""

from __future__ import annotations

import json

import torch

from streamgen.pipeline import StreamingPipeline
from streamgen_train import cli
from streamgen_train import components as C
from streamgen_train import stages
from streamgen_train.data import LatentSet

TINY = C.Sizes(
    height=32, width=32, vae_base_dim=4, vae_decoder_base_dim=4, text_dim=32, heads=2, head_dim=16, layers=2, ffn_dim=64
)


def test_every_stage_runs_and_the_export_streams(tmp_path):
    out, model = tmp_path / "run", tmp_path / "model"
    recipe = stages.Recipe(root=out, sizes=TINY, batch=4, clips=6, export_to=model)
    for stage in cli.ALL:
        cli.run_stage(recipe, stage, steps=1)
    recorded = [json.loads(line)["stage"] for line in (out / "summary.jsonl").read_text().splitlines()]
    assert recorded == list(cli.ALL)
    assert len(torch.load(out / "latents.pt", weights_only=True)["captions"]) == 6

    pipe = StreamingPipeline.from_pretrained(model, device="cpu")
    with pipe.start_session("a large red circle moving right quickly on a black background", seed=0) as session:
        frames = session.next_chunk()
    assert frames.shape[1:] == (32, 32, 3)


def test_the_latent_set_grows_in_place(tmp_path):
    """A larger `clips` encodes only the clips the cache lacks, and clip i is the same in every size of set."""
    vae = C.build_vae(TINY).eval()
    world = stages.Recipe(sizes=TINY).world
    path = tmp_path / "latents.pt"
    small = LatentSet.build(path, vae, world, clips=3, frames=2)
    grown = LatentSet.build(path, vae, world, clips=5, frames=2)
    assert grown.latents.shape[0] == 5 and grown.captions[:3] == small.captions
    torch.testing.assert_close(grown.latents[:3], small.latents)
    fresh = LatentSet.build(tmp_path / "fresh.pt", vae, world, clips=5, frames=2)
    torch.testing.assert_close(fresh.latents, grown.latents)
    assert LatentSet.build(path, vae, world, clips=2, frames=1).latents.shape[:2] == (2, 1)
