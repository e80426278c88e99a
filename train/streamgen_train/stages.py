"""The recipe, stage by stage: VAE -> teacher (+ text encoder) -> AnyFlow student (stage 1) -> on-policy
distillation (stage 2), a consistency baseline beside it, and the export of the default model.

Each stage reads the `final/` of the stages before it and writes its own, so any stage can be rerun or resumed
alone; a stage whose `final/` exists is skipped.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AnyFlowFARTransformer3DModel,
    AutoencoderKLWan,
    WanTransformer3DModel,
)
from transformers import AutoTokenizer, UMT5EncoderModel

from streamgen.config import StreamConfig
from streamgen.engine import SinkWindow, StreamingEngine, TextCondition
from streamgen.models import far_from_wan, load_transformer, wan_from_far
from streamgen.pipeline import DEFAULT_MODEL, StreamingPipeline
from . import components as C
from .data import CHUNKS, LatentSet, pixel_clips, set_latent_stats
from .loop import EMA, Run, generator, optimize
from .losses import (
    BINDING_CLASSES,
    TEACHER_STEPS,
    binding_loss,
    causal_velocity,
    consistency_loss,
    flow_matching_loss,
    flowmap_loss,
    teacher_loss,
)
from .world.scene import VideoWorld, example_captions

CAPTION = "a large red circle moving right quickly on a black background"
# The stage whose transformer `export` ships: stage 1, since stage 2 tracked the teacher less closely at every
# budget on this toy scale (docs/training.md).
SHIPPED_STAGE = "student"
# 65 video frames = 17 latent frames, on 32x32 crops (the VAE is convolutional; a crop costs a quarter of a frame).
# Each causal convolution caches 2 frames, but stacked they carry the stream's first frame (encoded alone, decoded
# without temporal upsampling) some 15 latent frames deep: a VAE trained on 5-frame clips (2 latent frames) never
# saw its steady state and broke every chunk after the first (docs/training.md, "Why the stream lost its prompt").
VAE_CLIP_FRAMES, VAE_CROP = 65, 32
_DECODER_SEED = 10**7  # the decoder stage's clips start here, past any the vae stage draws
BUDGETS = (
    1,
    2,
    4,
    8,
)  # stage 2 trains the budgets a stream uses; 16 and more are evaluated, not trained


@dataclass
class Recipe:
    """Where a run lives and how big its steps are (defaults: the CPU recipe of docs/training.md)."""

    root: Path = Path("runs/default")
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sizes: C.Sizes = field(default_factory=C.Sizes)
    batch: int = 8  # clips per transformer step; the VAE, on long cropped pixel clips, takes a quarter as many
    clips: int = 512  # latent training set size
    # The teacher's AdamW rate. Continuing a teacher, 1e-4 fit its batches 5-6% better than 3e-4 (session 9,
    # docs/training.md); from scratch only 3e-4 has been tried.
    teacher_lr: float = 3e-4
    text_lr: float | None = None  # the text encoder's rate in the teacher stage (None: `teacher_lr`)
    # The teacher stage's `binding_loss` weight (0: the diffusion loss alone): the toy encoder's stand-in for the
    # language pretraining UMT5 brings; at 0.1 it binds each direction to its object within 2000 steps (session 15).
    binding_weight: float = 0.1
    # The VAE stages' AdamW rate. None: each stage's own (1e-3 from scratch, 3e-4 for a decoder fine-tuned from the
    # vae stage's); a warm VAE fine-tunes better at 1e-4 (session 11).
    vae_lr: float | None = None
    teacher_guidance: float = C.TEACHER_GUIDANCE  # what the causal stages distil (> 1: against the empty caption)
    minutes: float | None = None  # time box per training stage
    warm_start: Path | None = (
        None  # another run whose finished stages initialise this run's models
    )
    export_to: Path = DEFAULT_MODEL

    @property
    def world(self) -> VideoWorld:
        return VideoWorld(self.sizes.height, self.sizes.width)

    def run(self, stage: str) -> Run:
        return Run(self.root, stage)

    def require(self, stage: str) -> Path:
        final = self.run(stage).final
        if not final.is_dir():
            raise FileNotFoundError(
                f"stage {stage!r} has not finished ({final} missing); run `streamgen train {stage}`"
            )
        return final


# Where a model directory (`StreamingPipeline.save_pretrained`) keeps each warm-started component: the teacher
# starts from the exported student, whose weights are the teacher's plus the FAR-only modules it ignores.
_MODEL_DIR_COMPONENT = {"vae": "vae", "text_encoder": "text_encoder", "teacher": "transformer"}


def warm(
    recipe: Recipe, module: torch.nn.Module, stage: str, component: str
) -> torch.nn.Module:
    """`module` with the weights `recipe.warm_start`'s stage finished with (continuing training elsewhere, e.g.
    on a GPU's run), or, when `warm_start` is an exported model directory (the shipped default model), with its
    component's weights; else as built."""
    if recipe.warm_start is not None:
        start = Path(recipe.warm_start)
        if (start / "model_index.json").is_file():
            path = start / _MODEL_DIR_COMPONENT[component]
            if component == "teacher":
                source = wan_from_far(load_transformer(path))
            else:
                source = type(module).from_pretrained(path)
        else:
            source = type(module).from_pretrained(start / stage / "final" / component)
        if component == "text_encoder":
            C.load_text_encoder_weights(module, source)  # which may have been trained with other position buckets
        else:
            module.load_state_dict(source.state_dict())
    return module.to(recipe.device)


# -- loading what earlier stages wrote ---------------------------------------------------------------------------
def load_vae(recipe: Recipe) -> AutoencoderKLWan:
    """The trained VAE, with the fine-tuned decoder once that stage has run (the encoder is the vae stage's)."""
    stage = "decoder" if recipe.run("decoder").done else "vae"
    return (
        AutoencoderKLWan.from_pretrained(recipe.require(stage) / "vae")
        .to(recipe.device)
        .eval()
    )


def load_text(recipe: Recipe) -> tuple:
    final = recipe.require("teacher")
    encoder = (
        UMT5EncoderModel.from_pretrained(final / "text_encoder")
        .to(recipe.device)
        .eval()
        .requires_grad_(False)
    )
    return AutoTokenizer.from_pretrained(final / "tokenizer"), encoder


def load_teacher(recipe: Recipe) -> WanTransformer3DModel:
    return (
        WanTransformer3DModel.from_pretrained(recipe.require("teacher") / "teacher")
        .to(recipe.device)
        .eval()
    )


def load_far(recipe: Recipe, stage: str) -> AnyFlowFARTransformer3DModel:
    path = recipe.require(stage) / "transformer"
    return AnyFlowFARTransformer3DModel.from_pretrained(path).to(recipe.device).eval()


def latent_set(recipe: Recipe) -> LatentSet:
    frames = recipe.sizes.clip_latent_frames
    return LatentSet.build(
        recipe.root / "latents.pt", load_vae(recipe), recipe.world, recipe.clips, frames
    )


# -- stages ------------------------------------------------------------------------------------------------------
def train_vae(recipe: Recipe, steps: int) -> dict[str, float]:
    """Reconstruction (L1 + L2, foreground pixels weighted up: shapes are a small part of each frame) + a small KL."""
    run = recipe.run("vae")
    vae = warm(recipe, C.build_vae(recipe.sizes), "vae", "vae")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr or 1e-3, weight_decay=0.0)

    def step(i: int) -> dict[str, float]:
        x, _ = pixel_clips(recipe.world, i, recipe.batch // 4, VAE_CLIP_FRAMES)
        x = _crop(x, VAE_CROP, generator(i, 5)).to(recipe.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator(i, 0, recipe.device))
        reconstruction = _reconstruction_loss(vae, z, x)
        kl = posterior.kl().mean() / z[0].numel()
        optimize(optimizer, reconstruction + 1e-4 * kl)
        return {"rec": reconstruction.item(), "kl": kl.item()}

    losses = run.train(
        steps, {"vae": vae}, {"vae": optimizer}, step, minutes=recipe.minutes
    )
    set_latent_stats(vae, recipe.world)
    vae.save_pretrained(run.final / "vae")
    return losses


def _reconstruction_loss(vae: AutoencoderKLWan, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + L2 of the decoded clip, pixels away from the frame's median (the shapes) weighted 5x."""
    error = vae.decode(z).sample - x
    background = x.flatten(3).median(dim=3).values[..., None, None]
    weight = 1 + 4 * ((x - background).abs().sum(1, keepdim=True) > 0.3).float()
    return (weight * (error.abs() + error.square())).mean()


def train_decoder(recipe: Recipe, steps: int) -> dict[str, float]:
    """The VAE's decoder alone, on latents of the frozen encoder: sharper frames without moving the latent space
    the transformers were trained in, so it can run after (or beside) them. Clips the vae stage did not draw.

    The decoder may be wider than the vae stage's (`Sizes.vae_decoder_base_dim`): it then starts from scratch
    (at a from-scratch learning rate), else from the vae stage's decoder."""
    run = recipe.run("decoder")
    trained = AutoencoderKLWan.from_pretrained(recipe.require("vae") / "vae")
    vae = AutoencoderKLWan.from_config(
        {**trained.config, "decoder_base_dim": recipe.sizes.vae_decoder_base_dim}
    )
    new_decoder = vae.config.decoder_base_dim != (trained.config.decoder_base_dim or trained.config.base_dim)
    weights = trained.state_dict()
    if new_decoder:
        weights = {k: v for k, v in weights.items() if not k.startswith("decoder.")}
    vae.load_state_dict(weights, strict=not new_decoder)
    vae = vae.to(recipe.device).requires_grad_(False)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for param in decoder:
        param.requires_grad_(True)
    lr = recipe.vae_lr or (1e-3 if new_decoder else 3e-4)
    optimizer = torch.optim.AdamW(decoder, lr=lr, weight_decay=0.0)

    def step(i: int) -> dict[str, float]:
        x, _ = pixel_clips(recipe.world, _DECODER_SEED + i, recipe.batch // 4, VAE_CLIP_FRAMES)
        x = _crop(x, VAE_CROP, generator(i, 6)).to(recipe.device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator(i, 7, recipe.device))
        reconstruction = _reconstruction_loss(vae, z, x)
        optimize(optimizer, reconstruction)
        return {"rec": reconstruction.item()}

    losses = run.train(steps, {"vae": vae}, {"decoder": optimizer}, step, minutes=recipe.minutes)
    vae.save_pretrained(run.final / "vae")
    return losses


def _crop(x: torch.Tensor, size: int, gen: torch.Generator, grid: int = 8) -> torch.Tensor:
    """A random `size`x`size` crop of `(B, C, T, H, W)` clips, aligned to an 8-pixel grid (a multiple of either
    VAE scale's stride)."""
    top, left = (int(torch.randint(0, (n - size) // grid + 1, (1,), generator=gen)) * grid for n in x.shape[-2:])
    return x[..., top : top + size, left : left + size]


def train_teacher(recipe: Recipe, steps: int) -> dict[str, float]:
    """Flow matching of the bidirectional Wan teacher, jointly with the text encoder (no pretrained UMT5 here); a
    `CAPTION_DROPOUT` share of captions is emptied, so the teacher also knows the unconditional velocity guidance
    needs."""
    run = recipe.run("teacher")
    data = latent_set(recipe)
    tokenizer = C.build_tokenizer()
    encoder = warm(
        recipe,
        C.build_text_encoder(recipe.sizes, len(tokenizer)),
        "teacher",
        "text_encoder",
    )
    teacher = warm(recipe, C.build_teacher(recipe.sizes), "teacher", "teacher")
    models = torch.nn.ModuleDict({"teacher": teacher, "text_encoder": encoder})
    # The binding loss's linear read-out trains with the encoder and is dropped with the run: only the encoder ships.
    head = torch.nn.Linear(recipe.sizes.text_dim, BINDING_CLASSES).to(recipe.device)
    text_lr = recipe.text_lr or recipe.teacher_lr
    groups = [
        {"params": teacher.parameters()},
        {"params": [*encoder.parameters(), *head.parameters()], "lr": text_lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=recipe.teacher_lr, weight_decay=0.01)
    ema = EMA(models)

    def step(i: int) -> dict[str, float]:
        x0, captions = data.batch(
            i, recipe.batch, recipe.sizes.clip_latent_frames, salt=1
        )
        dropped = torch.rand(len(captions), generator=generator(i, 5)) < C.CAPTION_DROPOUT
        captions = ["" if drop else c for c, drop in zip(captions, dropped.tolist())]
        text = C.encode_captions(tokenizer, encoder, captions)
        loss = teacher_loss(teacher, x0.to(recipe.device), text, generator(i, 1))
        losses = {"fm": loss}
        if recipe.binding_weight:
            losses["binding"] = binding_loss(head, text, captions)
            loss = loss + recipe.binding_weight * losses["binding"]
        optimize(optimizer, loss)
        ema.update(models)
        return {k: v.item() for k, v in losses.items()}

    losses = run.train(
        steps,
        {"teacher": teacher, "text_encoder": encoder, "binding_head": head, "ema": ema},
        {"opt": optimizer},
        step,
        minutes=recipe.minutes,
    )
    ema.average["teacher"].save_pretrained(run.final / "teacher")
    ema.average["text_encoder"].save_pretrained(run.final / "text_encoder")
    tokenizer.save_pretrained(run.final / "tokenizer")
    return losses


def _partition(gen: torch.Generator) -> tuple[int, ...]:
    """A stream prefix of 1..5 chunks: early chunks (little context) and late ones (compressed context) alike."""
    return CHUNKS[: int(torch.randint(1, len(CHUNKS) + 1, (1,), generator=gen))]


def _data_step(recipe: Recipe, data: LatentSet, tokenizer, encoder, i: int, salt: int):
    gen = generator(i, salt)
    partition = _partition(gen)
    x0, captions = data.batch(i, recipe.batch, sum(partition), salt=salt)
    with torch.no_grad():
        text = C.encode_captions(tokenizer, encoder, captions)
        guided = recipe.teacher_guidance > 1
        negative = C.encode_captions(tokenizer, encoder, [""] * len(captions)) if guided else None
    return x0.to(recipe.device), TextCondition(text, negative, recipe.teacher_guidance), partition, gen


def train_student(recipe: Recipe, steps: int) -> dict[str, float]:
    """Stage 1: the FAR student, initialised from the teacher, learns the forward flow map on data chunks."""
    teacher = load_teacher(recipe)
    student = far_from_wan(teacher).to(recipe.device)
    anchor = C.causal_teacher(teacher)

    def loss(x0, text, partition, gen) -> torch.Tensor:
        return flowmap_loss(student, anchor, x0, text, partition, gen)

    return _train_causal(recipe, "student", steps, student, loss, "flowmap", salt=2)


def train_consistency(recipe: Recipe, steps: int) -> dict[str, float]:
    """Baseline: consistency distillation of the same teacher into the same causal architecture, same data and
    steps as stage 1. r-blind (gate 0), so the engine's jump t -> r is exactly multistep consistency sampling.
    Its targets use the model itself (iCT style); like stage 1, it ships its weights' average."""
    teacher = C.causal_teacher(load_teacher(recipe))
    model = copy.deepcopy(teacher).requires_grad_(True)
    grid = _sigmas(teacher, TEACHER_STEPS)

    def loss(x0, text, partition, gen) -> torch.Tensor:
        return consistency_loss(model, teacher, x0, text, partition, gen, grid)

    return _train_causal(recipe, "consistency", steps, model, loss, "cd", salt=3)


def _train_causal(
    recipe: Recipe,
    stage: str,
    steps: int,
    model: AnyFlowFARTransformer3DModel,
    loss: Callable[[torch.Tensor, torch.Tensor, tuple[int, ...], torch.Generator], torch.Tensor],
    name: str,
    salt: int,
) -> dict[str, float]:
    """What stage 1 and the baseline share: `loss(x0, text, partition, gen)` on teacher-forced data chunks (the
    same data, batch and optimizer for both, so they compare), logged as `name`; ships the EMA of `model`."""
    run = recipe.run(stage)
    data = latent_set(recipe)
    tokenizer, encoder = load_text(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ema = EMA(model)

    def step(i: int) -> dict[str, float]:
        x0, text, partition, gen = _data_step(recipe, data, tokenizer, encoder, i, salt=salt)
        value = loss(x0, text, partition, gen)
        optimize(optimizer, value)
        ema.update(model)
        return {name: value.item()}

    losses = run.train(steps, {stage: model, "ema": ema}, {"opt": optimizer}, step, minutes=recipe.minutes)
    ema.average.save_pretrained(run.final / "transformer")
    return losses


def _sigmas(model: AnyFlowFARTransformer3DModel, steps: int) -> torch.Tensor:
    """The sampling grid 1 = s_0 > ... > s_steps = 0 of a `steps` budget (the scheduler's shifted one)."""
    plan = StreamingEngine(model, C.build_scheduler()).schedule(steps)
    return torch.tensor([float(s.sigma_t) for s in plan] + [float(plan[-1].sigma_r)])


def _chunk_velocity(model, context, z, t, r, text, partition):
    """u for the last chunk `z` given clean self-generated `context`, per-sample sigmas `t`, `r` of shape (B,)."""
    frames = torch.cat([context, z], dim=1)
    ctx = torch.zeros(z.shape[0], context.shape[1], device=z.device)

    def per_frame(sigma: torch.Tensor) -> torch.Tensor:
        return torch.cat([ctx, sigma[:, None].expand(-1, z.shape[1])], dim=1)

    return causal_velocity(
        model, frames, frames, per_frame(t), per_frame(r), text, partition
    )[:, -z.shape[1] :]


def train_distill(recipe: Recipe, steps: int) -> dict[str, float]:
    """Stage 2: on-policy backward simulation with DMD against the teacher, co-trained with the stage-1 loss.

    Per step: a random budget N and index k; the student streams the earlier chunks itself (KV-cached engine, no
    gradient), then makes the current chunk in three jumps 1 -> s_k -> s_{k+1} -> 0 of that budget's grid, with
    gradient. DMD moves the result along (fake score - teacher score); the fake score, a copy of the teacher,
    keeps learning the student's own chunks.
    """
    run = recipe.run("distill")
    data = latent_set(recipe)
    tokenizer, encoder = load_text(recipe)
    student = load_far(recipe, "student")
    real = C.causal_teacher(load_teacher(recipe))
    fake = copy.deepcopy(real).requires_grad_(True)
    opt_student = torch.optim.AdamW(student.parameters(), lr=2e-5, weight_decay=0.0)
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=1e-4, weight_decay=0.0)
    engine = StreamingEngine(student, C.build_scheduler())
    grids = {n: _sigmas(student, n).to(recipe.device) for n in BUDGETS}

    def step(i: int) -> dict[str, float]:
        x0, text, partition, gen = _data_step(
            recipe, data, tokenizer, encoder, i, salt=4
        )
        budget = BUDGETS[int(torch.randint(len(BUDGETS), (1,), generator=gen))]
        k = int(torch.randint(budget, (1,), generator=gen))
        grid = grids[budget]
        batch = x0.shape[0]

        context = _stream(engine, text.embeds, partition[:-1], budget, x0.shape[2:], gen)
        z = torch.randn(batch, partition[-1], *x0.shape[2:], generator=gen).to(
            recipe.device
        )
        marks = sorted({1.0, float(grid[k]), float(grid[k + 1]), 0.0}, reverse=True)
        for a, b in itertools.pairwise(marks):
            ta, tb = (torch.full((batch,), s, device=recipe.device) for s in (a, b))
            z = z - (a - b) * _chunk_velocity(
                student, context, z, ta, tb, text.embeds, partition
            )
        dmd = 0.5 * F.mse_loss(
            z, _dmd_target(real, fake, context, z, text, partition, gen)
        )
        stage1 = flowmap_loss(student, real, x0, text, partition, gen)
        optimize(opt_student, dmd + stage1)

        rollout = torch.cat([context, z.detach()], dim=1)
        fake_loss = flow_matching_loss(fake, rollout, rollout, text.embeds, partition, gen)
        optimize(opt_fake, fake_loss)
        return {"dmd": dmd.item(), "flowmap": stage1.item(), "fake": fake_loss.item()}

    modules = {"student": student, "fake": fake}
    losses = run.train(
        steps,
        modules,
        {"student": opt_student, "fake": opt_fake},
        step,
        checkpoint_every=25,
        minutes=recipe.minutes,
    )
    student.save_pretrained(run.final / "transformer")
    return losses


@torch.no_grad()
def _stream(engine, text, sizes, steps, shape, gen) -> torch.Tensor:
    """The student's own stream for chunks of `sizes` at a `steps` budget, through the KV-cached engine; `shape`:
    a latent frame's (channels, h, w)."""
    cache = engine.new_cache(tuple(shape[1:]), max(CHUNKS), SinkWindow(1, None))
    condition = TextCondition(text)
    chunks = [torch.zeros(text.shape[0], 0, *shape, device=text.device)]
    for frames in sizes:
        noise = torch.randn(text.shape[0], frames, *shape, generator=gen).to(
            text.device
        )
        latents = engine.denoise(cache, noise, condition, steps)
        engine.commit(cache, latents, condition)
        chunks.append(latents)
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def _dmd_target(real, fake, context, x, text, partition, gen) -> torch.Tensor:
    """Where distribution matching moves a generated chunk: against (fake x0 - real x0) at a random noise level,
    normalised as in DMD. The student regresses onto it (0.5 * MSE, whose gradient is exactly that direction).
    The real score is the guided teacher's (`text`), the fake score unguided, as in DMD."""
    batch = x.shape[0]
    sigma = (
        C.shifted_sigmas(torch.rand(batch, generator=gen))
        .clamp(0.02, 0.98)
        .to(x.device)
    )
    s = sigma[:, None, None, None, None]
    z = (1 - s) * x + s * torch.randn(x.shape, generator=gen).to(x.device)
    real_v = _chunk_velocity(
        real, text.batch(context), text.batch(z), text.batch(sigma), text.batch(sigma), text.model_input, partition
    )
    x_real = z - s * text.combine(real_v)
    x_fake = z - s * _chunk_velocity(fake, context, z, sigma, sigma, text.embeds, partition)
    scale = (x - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-4)
    return x - (x_fake - x_real) / scale


def export(recipe: Recipe, stage: str = SHIPPED_STAGE) -> dict:
    """Write the default model: `stage`'s transformer with the trained VAE and text encoder."""
    tokenizer, encoder = load_text(recipe)
    pipe = StreamingPipeline(
        transformer=load_far(recipe, stage),
        vae=load_vae(recipe),
        scheduler=C.build_scheduler(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        config=StreamConfig(height=recipe.sizes.height, width=recipe.sizes.width),
        example_prompts=example_captions(),
    )
    pipe.save_pretrained(recipe.export_to)
    size = sum(
        f.stat().st_size for f in Path(recipe.export_to).rglob("*") if f.is_file()
    )
    return {
        "exported": str(recipe.export_to),
        "from": stage,
        "megabytes": round(size / 2**20, 2),
    } | chunk_latency(StreamingPipeline.from_pretrained(recipe.export_to, device="cpu"))


def chunk_latency(pipe: StreamingPipeline, chunks: int = 8) -> dict[str, float]:
    """Median seconds for one 3-latent-frame chunk (12 video frames) at the model's default budget, decode
    included, after the first chunk: what real time at 16 fps has to beat (0.75 s)."""
    with torch.no_grad(), pipe.start_session(CAPTION, seed=0) as session:
        times = []
        for _ in range(chunks):
            session.next_chunk()
            times.append(session.timing.total)
    return {
        "chunk_seconds": round(sorted(times[1:])[len(times[1:]) // 2], 3),
        "chunk_steps": pipe.config.steps,
    }
