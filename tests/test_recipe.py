"""The whole training recipe end to end on a tiny model, stage by stage as `streamgen train all` runs it: every
stage hands the next what it needs, and the export streams."""

from __future__ import annotations

import json

import pytest
import torch

from streamgen.pipeline import StreamingPipeline
from streamgen_train import cli
from streamgen_train import components as C
from streamgen_train import stages
from streamgen_train.data import LatentSet

def test_every_stage_runs_and_the_export_streams(tiny_run: stages.Recipe):
    recorded = [json.loads(line)["stage"] for line in (tiny_run.root / "summary.jsonl").read_text().splitlines()]
    assert recorded == list(cli.ALL)
    assert len(torch.load(tiny_run.root / "latents.pt", weights_only=True)["captions"]) == tiny_run.clips

    pipe = StreamingPipeline.from_pretrained(tiny_run.export_to, device="cpu")
    with pipe.start_session("a large red circle moving right quickly on a black background", seed=0) as session:
        frames = session.next_chunk()
    assert frames.shape[1:] == (32, 32, 3)


def test_the_latent_set_grows_in_place(tiny_run: stages.Recipe, tmp_path):
    """A larger `clips` encodes only the clips the cache lacks, and clip i is the same in every size of set."""
    vae = C.build_vae(tiny_run.sizes).eval()
    world = tiny_run.world
    path = tmp_path / "latents.pt"
    small = LatentSet.build(path, vae, world, clips=3, frames=2)
    grown = LatentSet.build(path, vae, world, clips=5, frames=2)
    assert grown.latents.shape[0] == 5 and grown.captions[:3] == small.captions
    torch.testing.assert_close(grown.latents[:3], small.latents)
    fresh = LatentSet.build(tmp_path / "fresh.pt", vae, world, clips=5, frames=2)
    torch.testing.assert_close(fresh.latents, grown.latents)
    assert LatentSet.build(path, vae, world, clips=2, frames=1).latents.shape[:2] == (2, 1)


def test_a_warm_start_from_an_exported_model_takes_its_weights(tiny_run: stages.Recipe, tmp_path):
    """`--warm-start <model directory>`: the teacher starts from the exported student read as a Wan model, the VAE and
    text encoder from the model's own (how a session continues the shipped model when no run of it survives)."""
    model = tiny_run.export_to
    recipe = stages.Recipe(root=tmp_path, sizes=tiny_run.sizes, warm_start=model)
    pipe = StreamingPipeline.from_pretrained(model, device="cpu")
    student = pipe.transformer.state_dict()
    teacher = stages.warm(recipe, C.build_teacher(recipe.sizes), "teacher", "teacher").state_dict()
    assert all(torch.equal(v, student[k]) for k, v in teacher.items())
    vae = stages.warm(recipe, C.build_vae(recipe.sizes), "vae", "vae").state_dict()
    assert all(torch.equal(v, pipe.vae.state_dict()[k]) for k, v in vae.items())


def test_finer_latents_train_and_stream_with_the_same_token_grid(tmp_path):
    """`--vae-scale 4 --patch 4`: a VAE of 4x space (the same 4x time) and transformers of patch 4 train through the
    recipe, and the export streams past `full_chunk_limit` (context then embedded at 1x8x8, twice the patch)."""
    sizes = C.Sizes(height=32, width=32, vae_base_dim=4, vae_decoder_base_dim=4, text_dim=32, heads=2, head_dim=16,
                    layers=2, ffn_dim=64, vae_scale=4, patch=4)  # fmt: skip
    recipe = stages.Recipe(root=tmp_path, sizes=sizes, batch=4, clips=6, export_to=tmp_path / "model")
    for stage in ("vae", "teacher", "student", "export"):
        cli.run_stage(recipe, stage, steps=1)
    pipe = StreamingPipeline.from_pretrained(recipe.export_to, device="cpu")
    assert pipe.latent_scale == (4, 4)
    assert tuple(pipe.transformer.config.compressed_patch_size) == (1, 8, 8)
    chunks = len(pipe.transformer.config.chunk_partition)
    with pipe.start_session("a large red circle moving right quickly on a black background", seed=0) as session:
        frames = [session.next_chunk() for _ in range(chunks)]
    assert [f.shape[1:] for f in frames] == [(32, 32, 3)] * chunks
    assert all(torch.isfinite(torch.as_tensor(f, dtype=torch.float32)).all() for f in frames)
    with pytest.raises(ValueError, match="vae_scale"):
        C.build_vae(C.Sizes(vae_scale=2))


def test_the_cli_builds_a_teacher_of_the_width_it_is_given(tiny_run: stages.Recipe, tmp_path):
    """`--heads` and `--ffn-dim` reach the teacher it builds (at `--patch 4` the shipped width cannot carry a token's
    256 latent values, docs/training.md session 19); the run reuses the tiny run's VAE."""
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "final").symlink_to(tiny_run.run("vae").final)
    argv = ["teacher", "--out", str(tmp_path), "--steps", "1", "--clips", "2", "--batch", "2", "--layers", "1"]
    assert cli.main([*argv, "--heads", "2", "--ffn-dim", "64"]) == 0
    config = json.loads((tmp_path / "teacher" / "final" / "teacher" / "config.json").read_text())
    assert (config["num_attention_heads"], config["ffn_dim"], config["num_layers"]) == (2, 64, 1)
