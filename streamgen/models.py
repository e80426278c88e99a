"""Loading transformers into the class the engine runs: diffusers' `AnyFlowFARTransformer3DModel`.

NVIDIA's AnyFlow-FAR checkpoints load as they are. A plain Wan2.1 `WanTransformer3DModel` (a teacher) loads too:
its weights are the FAR model's minus two modules, which get the values the FAR recipe starts from: the delta
embedder copies the time embedder (so with r = t the student is exactly the teacher) and the compressed patch
embedding is the full one, trilinearly resized.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AnyFlowFARTransformer3DModel, WanTransformer3DModel

_WAN_KEYS = (
    "patch_size num_attention_heads attention_head_dim in_channels out_channels text_dim freq_dim ffn_dim "
    "num_layers cross_attn_norm eps image_dim rope_max_seq_len"
).split()


# NVIDIA's bidirectional AnyFlow-Wan2.1-T2V, by the class its pipeline or transformer directory names (the file).
BIDIRECTIONAL = {"model_index.json": "AnyFlowPipeline", "config.json": "AnyFlowTransformer3DModel"}


class NotCausalError(ValueError):
    """The directory holds the bidirectional AnyFlow model, which cannot stream."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__(
            f"{directory} holds the bidirectional AnyFlow model, which is not causal and cannot stream; "
            "`streamgen generate --model` renders it as a whole clip through diffusers' AnyFlowPipeline"
        )


def is_bidirectional(directory: str | Path) -> bool:
    """Whether a pipeline or transformer directory holds the bidirectional AnyFlow model (the one check)."""
    for name, bidirectional in BIDIRECTIONAL.items():
        file = Path(directory) / name
        if file.is_file() and json.loads(file.read_text()).get("_class_name") == bidirectional:
            return True
    return False


def transformer_class(directory: str | Path) -> str:
    config = Path(directory) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no transformer config at {config}")
    return json.loads(config.read_text())["_class_name"]


def far_from_wan(wan: WanTransformer3DModel) -> AnyFlowFARTransformer3DModel:
    """An AnyFlow-FAR student initialised from a Wan teacher."""
    config = {key: wan.config[key] for key in _WAN_KEYS if key in wan.config}
    config["patch_size"] = tuple(config["patch_size"])
    # Context past `full_chunk_limit` chunks is embedded at twice the patch a side (FAR's 1x4x4 over Wan's 1x2x2).
    config["compressed_patch_size"] = (config["patch_size"][0], *(2 * p for p in config["patch_size"][1:]))
    far = AnyFlowFARTransformer3DModel(**config)
    missing, unexpected = far.load_state_dict(wan.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("condition_embedder.delta_embedder.", "far_patch_embedding.")) for k in missing):
        raise ValueError(f"not a Wan2.1 transformer: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        emb = far.condition_embedder
        emb.delta_embedder.load_state_dict(emb.time_embedder.state_dict())
        full = far.patch_embedding.weight
        resized = F.interpolate(
            full.reshape(-1, 1, *full.shape[2:]), size=far.config.compressed_patch_size, mode="trilinear"
        )
        far.far_patch_embedding.weight.copy_(resized.reshape(*full.shape[:2], *resized.shape[2:]))
        far.far_patch_embedding.bias.copy_(far.patch_embedding.bias)
    return far.to(wan.dtype)


def wan_from_far(far: AnyFlowFARTransformer3DModel) -> WanTransformer3DModel:
    """The Wan transformer a FAR student carries: its weights without the FAR-only modules `far_from_wan` added (the
    teacher it was initialised from, as distillation left it)."""
    wan = WanTransformer3DModel(**{key: far.config[key] for key in _WAN_KEYS if key in far.config})
    weights = far.state_dict()
    wan.load_state_dict({key: weights[key] for key in wan.state_dict()})
    return wan.to(far.dtype)


def load_transformer(
    directory: str | Path, dtype: torch.dtype | None = None
) -> AnyFlowFARTransformer3DModel:
    """Load a FAR (student) or Wan (teacher) transformer directory written by `save_pretrained`."""
    if is_bidirectional(directory):
        raise NotCausalError(directory)
    name = transformer_class(directory)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if name == "AnyFlowFARTransformer3DModel":
        return AnyFlowFARTransformer3DModel.from_pretrained(directory, **kwargs).eval()
    if name == "WanTransformer3DModel":
        return far_from_wan(WanTransformer3DModel.from_pretrained(directory, **kwargs)).eval()
    raise ValueError(f"{directory}: unsupported transformer class {name!r}")
