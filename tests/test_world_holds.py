"""The shipped model holds its world over a long stream (issue 11), and the real-image clips it was trained on.

The old default model lost the captioned background at the first continuation chunk: its VAE, trained on 5-frame
clips, had never decoded in its steady state (docs/training.md). Judged by the world's own analysis, not by eye.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from streamgen.pipeline import StreamingPipeline
from streamgen_train import components as C
from streamgen_train import footage, stages
from streamgen_train.world.grammar import parse_caption
from streamgen_train.world.scorer import background_name, estimate_background

# The three prompts of the issue report, streamed together (one batched transformer call per step).
PROMPTS = (
    "a large yellow square moving down slowly on a black background",
    "a large red circle moving right quickly on a gray background",
    "a large white triangle moving left slowly on a dark blue background",
)
CHUNKS = 20


@pytest.fixture(scope="module")
def shipped(one_torch_thread) -> StreamingPipeline:
    return StreamingPipeline.default(device="cpu")


def test_the_captioned_background_holds_after_20_chunks(shipped):
    sessions = [shipped.start_session(prompt, seed=3) for prompt in PROMPTS]
    try:
        for _ in range(CHUNKS):
            last = shipped.next_chunks(sessions)
    finally:
        for session in sessions:
            session.close()
    seen = [background_name(estimate_background(frames)) for frames in last]
    assert seen == [parse_caption(prompt).background for prompt in PROMPTS]


def test_footage_clips_are_real_images_moving_and_held_out_ones_apart():
    a = footage.clip((1, 2), 9)
    assert a.shape == (9, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, footage.clip((1, 2), 9))  # a pure function of the seed, like the world's clips
    assert np.abs(a[-1].astype(int) - a[0]).mean() > 1  # the camera moves
    assert a.std() > 10  # a photograph, not a flat field
    assert not set(footage.HELD_OUT) & set(footage.TRAIN)
    held = footage.clip(0, 5, 32, 48, names=footage.HELD_OUT[:1])
    assert held.shape == (5, 32, 48, 3)


def test_the_shipped_model_offers_example_prompts_made_of_words_it_knows(shipped):
    known = set(shipped.known_words())
    assert "circle" in known and "boat" not in known
    assert shipped.example_prompts
    for prompt in shipped.example_prompts:
        assert parse_caption(prompt) is not None
        assert set(prompt.split()) <= known


@pytest.mark.parametrize("decoder_width", [4, 8])
def test_decoder_stage_moves_the_decoder_and_keeps_the_latent_space(tmp_path, one_torch_thread, decoder_width):
    """The decoder is fine-tuned (or, wider, trained anew) after the transformers learned the encoder's latents:
    the encoder and its latent statistics must not move."""
    sizes = C.Sizes(height=32, width=32, vae_base_dim=4, vae_decoder_base_dim=4)
    vae = C.build_vae(sizes)
    vae.register_to_config(latents_mean=[0.5] * 16)  # as the vae stage measures them
    recipe = stages.Recipe(root=tmp_path, sizes=replace(sizes, vae_decoder_base_dim=decoder_width), batch=4)
    vae.save_pretrained(recipe.run("vae").final / "vae")
    stages.train_decoder(recipe, steps=1)
    tuned = stages.load_vae(recipe)  # the decoder stage's, now that it has run
    assert tuned.config.decoder_base_dim == decoder_width
    assert tuned.config.latents_mean == vae.config.latents_mean
    for name in ("encoder", "quant_conv"):
        for before, after in zip(getattr(vae, name).parameters(), getattr(tuned, name).parameters()):
            assert torch.equal(before, after)
    if decoder_width == 4:
        assert not all(torch.equal(a, b) for a, b in zip(vae.decoder.parameters(), tuned.decoder.parameters()))
