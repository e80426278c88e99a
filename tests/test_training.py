"""Training recipe on tiny configs (each stage's step lowers its loss), and the shipped default model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import AnyFlowFARTransformer3DModel, AutoencoderKLWan
from transformers import UMT5EncoderModel

from streamgen.engine import TextCondition
from streamgen.models import far_from_wan, wan_from_far
from streamgen.pipeline import DEFAULT_MODEL, StreamingPipeline
from streamgen_train import components as C
from streamgen_train import stages
from streamgen_train.data import pixel_clips
from streamgen_train.losses import (
    BINDING_ATTRIBUTES,
    BINDING_CLASSES,
    binding_labels,
    binding_loss,
    consistency_loss,
    flow_matching_loss,
    flowmap_loss,
    teacher_loss,
)
from streamgen_train.world.scene import VideoWorld
from streamgen_train.world.scorer import semantic_score

TINY = C.Sizes(
    height=32,
    width=32,
    vae_base_dim=4,
    vae_decoder_base_dim=4,
    text_dim=32,
    heads=2,
    head_dim=16,
    layers=2,
    ffn_dim=64,
)


def guided(tokenizer, encoder, captions: list[str]) -> TextCondition:
    """The prompts' embeddings as the causal stages see them, guided against the empty caption (at 3, so the guided
    path is exercised whatever the recipe's `TEACHER_GUIDANCE`)."""
    with torch.no_grad():
        embeds, negative = (C.encode_captions(tokenizer, encoder, c) for c in (captions, [""] * len(captions)))
    return TextCondition(embeds, negative, 3.0)


CAPTIONS = [
    "a large red circle moving right quickly on a black background",
    "a small blue square moving up slowly on a gray background",
]


def decreases(loss_fn, params, steps: int = 3, lr: float = 1e-3) -> tuple[float, float]:
    """Loss before and after a few Adam steps on the same batch and noise (`loss_fn` reseeds itself)."""
    optimizer = torch.optim.Adam(params, lr=lr)
    before = loss_fn().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    return before, loss_fn().item()


@pytest.fixture(scope="module")
def text():
    torch.manual_seed(0)
    tokenizer = C.build_tokenizer()
    encoder = C.build_text_encoder(TINY, len(tokenizer))
    return tokenizer, encoder


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return C.build_teacher(TINY)


def latents(frames: int) -> torch.Tensor:
    return torch.randn(2, frames, 16, 4, 4, generator=torch.Generator().manual_seed(1))


def test_tokenizer_covers_the_grammar_and_anything_else():
    tokenizer = C.build_tokenizer()
    ids = tokenizer(CAPTIONS[0]).input_ids
    assert C.UNK not in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer("A purple Elephant!").input_ids.count(tokenizer.unk_token_id) == 3


def test_vae_step_lowers_reconstruction_loss():
    torch.manual_seed(0)
    vae = C.build_vae(TINY)
    x, _ = pixel_clips(VideoWorld(32, 32), 0, 1, 5)

    def loss():
        return (vae.decode(vae.encode(x).latent_dist.mode()).sample - x).square().mean()

    before, after = decreases(loss, vae.parameters(), steps=2, lr=3e-3)
    assert after < before


def test_teacher_step_lowers_flow_matching_loss(text, teacher):
    tokenizer, encoder = text
    model, enc = copy.deepcopy(teacher), copy.deepcopy(encoder)

    def loss():
        return teacher_loss(
            model,
            latents(13),
            C.encode_captions(tokenizer, enc, CAPTIONS),
            torch.Generator().manual_seed(2),
        )

    before, after = decreases(loss, [*model.parameters(), *enc.parameters()])
    assert after < before


def test_binding_loss_labels_each_token_with_its_own_object_and_trains_the_encoder(text):
    """Every token of an object's clause is labelled with that object's attributes (the second clause's with the
    second object's), "and" and the background clause with none; a few steps lower the loss."""
    tokenizer, encoder = text
    captions = [
        "a large red circle moving up left quickly and a small blue square moving down slowly on a gray background",
        "",
    ]
    words = captions[0].split()
    assert len(tokenizer(captions[0]).input_ids) == len(words)  # one token a word: labels index tokens
    labels = binding_labels(captions, C.MAX_SEQUENCE_LENGTH)
    direction = list(BINDING_ATTRIBUTES).index("direction")
    names = BINDING_ATTRIBUTES["direction"]
    first, second = words.index("red"), words.index("blue")
    assert names[labels[0, first, direction]] == "up left" and names[labels[0, second, direction]] == "down"
    assert (labels[0, words.index("and")] == -100).all() and (labels[0, len(words) - 4 :] == -100).all()
    assert (labels[1] == -100).all()
    enc = copy.deepcopy(encoder)
    head = torch.nn.Linear(TINY.text_dim, BINDING_CLASSES)

    def loss():
        return binding_loss(head, C.encode_captions(tokenizer, enc, captions), captions)

    before, after = decreases(loss, [*enc.parameters(), *head.parameters()], steps=5, lr=1e-2)
    assert after < 0.8 * before
    assert binding_loss(head, C.encode_captions(tokenizer, enc, [""]), [""]).item() == 0


def test_text_encoder_keeps_its_function_in_finer_position_buckets():
    """An encoder trained with T5's coarse relative-position buckets (8 up to offset 128: offsets 2-15 share one
    bias) warm-starts the recipe's finer ones unchanged, and the finer ones tell those offsets apart."""
    torch.manual_seed(4)
    fine = C.build_text_encoder(TINY, 50).eval()
    coarse_config = copy.deepcopy(fine.config)
    coarse_config.relative_attention_num_buckets, coarse_config.relative_attention_max_distance = 8, 128
    coarse = UMT5EncoderModel(coarse_config).eval()
    C.load_text_encoder_weights(fine, coarse)
    ids = torch.randint(2, 50, (2, C.MAX_SEQUENCE_LENGTH))
    with torch.no_grad():
        assert torch.allclose(fine(ids).last_hidden_state, coarse(ids).last_hidden_state, atol=1e-6)
    offsets = torch.arange(2, 16)
    bucket = fine.encoder.block[0].layer[0].SelfAttention._relative_position_bucket
    assert len(set(bucket(offsets).tolist())) == len(set(bucket(-offsets).tolist())) == 10  # 2-7 exact, 8-15 in 4
    assert len(set(coarse.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(offsets).tolist())) == 1


def test_wan_from_far_gives_back_the_teacher_a_student_was_built_from():
    """What quality.py and a warm start read as the teacher of an exported model: the student without its FAR-only
    modules, so a student fresh from `far_from_wan` gives back exactly its teacher."""
    torch.manual_seed(3)
    teacher = C.build_teacher(TINY).eval()
    student = far_from_wan(teacher)
    with torch.no_grad():
        student.far_patch_embedding.weight.add_(1.0)  # FAR-only: not part of the teacher
    recovered = wan_from_far(student).eval()
    assert recovered.state_dict().keys() == teacher.state_dict().keys()
    assert all(torch.equal(v, recovered.state_dict()[k]) for k, v in teacher.state_dict().items())
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0])
    text = torch.randn(1, 3, TINY.text_dim)
    with torch.no_grad():
        assert torch.equal(recovered(x, t, text).sample, teacher(x, t, text).sample)


@pytest.mark.parametrize("partition", [(1,), (1, 3, 3, 3)])
def test_student_step_lowers_flowmap_loss(text, teacher, partition):
    tokenizer, encoder = text
    torch.manual_seed(1)  # a student that differs from its anchor, so the loss has something to lower
    student = far_from_wan(C.build_teacher(TINY))
    anchor = C.causal_teacher(teacher)
    condition = guided(tokenizer, encoder, CAPTIONS)
    x0 = latents(sum(partition))

    def loss():
        return flowmap_loss(
            student, anchor, x0, condition, partition, torch.Generator().manual_seed(6)
        )

    before, after = decreases(loss, student.parameters())
    assert after < before


def test_consistency_step_lowers_its_loss(text, teacher):
    tokenizer, encoder = text
    frozen = C.causal_teacher(teacher)
    model = copy.deepcopy(frozen).requires_grad_(True)
    condition = guided(tokenizer, encoder, CAPTIONS)
    grid = torch.linspace(1, 0, 9)

    def loss():
        return consistency_loss(
            model,
            frozen,
            latents(7),
            condition,
            (1, 3, 3),
            torch.Generator().manual_seed(4),
            grid,
        )

    before, after = decreases(loss, model.parameters())
    assert after < before


def test_distill_step_lowers_fake_score_and_dmd_losses(text, teacher):
    """Stage 2's two updates: the fake score fits the student's rollout; then (fake != teacher) the student's chunk
    moves towards its DMD target."""
    tokenizer, encoder = text
    condition = guided(tokenizer, encoder, CAPTIONS)
    embeds = condition.embeds
    real = C.causal_teacher(teacher)
    fake = copy.deepcopy(real).requires_grad_(True)
    student = far_from_wan(teacher)
    partition = (1, 3)
    context, noise, rollout = latents(1), latents(3), latents(4)

    def fake_loss():
        return flow_matching_loss(
            fake, rollout, rollout, embeds, partition, torch.Generator().manual_seed(6)
        )

    before, after = decreases(fake_loss, fake.parameters(), lr=1e-2)
    assert after < before

    def chunk():
        one, zero = torch.ones(2), torch.zeros(2)
        return noise - stages._chunk_velocity(
            student, context, noise, one, zero, embeds, partition
        )

    target = stages._dmd_target(
        real, fake, context, chunk().detach(), condition, partition, torch.Generator()
    )
    before, after = decreases(
        lambda: 0.5 * torch.nn.functional.mse_loss(chunk(), target),
        student.parameters(),
    )
    assert 0 < after < before


@pytest.fixture
def one_thread():
    """A shared CPU's contended thread pool makes these streams ten times slower than one thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stream_score(pipe: StreamingPipeline, prompts: list[str]) -> float:
    scores = []
    for i, prompt in enumerate(prompts):
        with pipe.start_session(prompt, seed=i) as session:
            frames = np.concatenate([session.next_chunk() for _ in range(3)])
        scores.append(semantic_score(frames, prompt))
    return float(np.mean(scores))


@pytest.mark.skipif(
    not (DEFAULT_MODEL / "model_index.json").is_file(),
    reason="default model not exported yet",
)
def test_default_model_beats_untrained_weights_of_its_shape(one_thread):
    torch.manual_seed(0)
    trained = StreamingPipeline.default(device="cpu")
    untrained = StreamingPipeline(
        transformer=AnyFlowFARTransformer3DModel.from_config(
            trained.transformer.config
        ).eval(),
        vae=AutoencoderKLWan.from_config(trained.vae.config).eval(),
        scheduler=trained.scheduler,
        text_encoder=UMT5EncoderModel(trained.text_encoder.config).eval(),
        tokenizer=trained.tokenizer,
        config=trained.config,
    )
    prompts = [
        CAPTIONS[0],
        "a large green triangle moving down slowly on a dark blue background",
        CAPTIONS[1],
    ]
    assert (
        trained.config.height == 64
        and trained.prompts.max_sequence_length == C.MAX_SEQUENCE_LENGTH
    )
    assert _stream_score(trained, prompts) > _stream_score(untrained, prompts)


def test_ema_averages_weights_and_resumes_without_one(tmp_path):
    from streamgen_train.loop import EMA, Run

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 1/10): the average moves 90% of the way
    assert torch.allclose(ema.average.weight, start + 0.9)
    for _ in range(50):
        ema.update(model)
    assert torch.allclose(ema.average.weight, model.weight, atol=1e-6)
    assert not any(p.requires_grad for p in ema.average.parameters())

    # A checkpoint written before the stage had an average resumes; the average starts from what it was given.
    run = Run(tmp_path, "stage")
    run._save(7, {"model": model}, {})
    fresh = EMA(torch.nn.Linear(3, 2))
    given = fresh.average.weight.detach().clone()
    assert run._resume({"model": torch.nn.Linear(3, 2), "ema": fresh}, {}) == 7
    assert torch.equal(fresh.average.weight, given) and int(fresh.updates) == 0


def test_resume_keeps_the_optimizer_state_and_takes_the_new_learning_rate(tmp_path):
    from streamgen_train.loop import Run

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    run = Run(tmp_path, "stage")
    run._save(1, {"model": model}, {"opt": optimizer})
    resumed = torch.optim.AdamW(model.parameters(), lr=1e-4)
    assert run._resume({"model": model}, {"opt": resumed}) == 1
    assert resumed.param_groups[0]["lr"] == 1e-4
    moments = resumed.state[model.weight]["exp_avg"]
    assert torch.equal(moments, optimizer.state[model.weight]["exp_avg"]) and moments.abs().sum() > 0
