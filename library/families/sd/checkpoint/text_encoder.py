"""SD text encoders: SD1 CLIP-L (``cond_stage_model.transformer.*``) and SD2 OpenCLIP
(``cond_stage_model.model.*``) <-> transformers ``CLIPTextModel`` key maps and the
:class:`TextEncoderShape` read from a checkpoint or a ``CLIPTextConfig``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .common import (
    _WEIGHT,
    _WEIGHT_BIAS,
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    CheckpointError,
    Converted,
    Parts,
    StateDict,
    _indices,
    _Module,
    _refuse_unplaced,
    _rename,
    _require,
    _same,
    _strip,
)

TextEncoderKind = Literal["clip_l", "openclip"]


_CLIP_LAYER_PARTS: Parts = _same(
    "self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.out_proj.",
    "layer_norm1.", "mlp.fc1.", "mlp.fc2.", "layer_norm2.")


def transformers_text_prefix(model: torch.nn.Module) -> str:
    """``"text_model."`` when this transformers version nests ``CLIPTextModel`` modules under
    ``text_model`` (transformers 4), ``""`` when it does not (transformers 5)."""
    return "text_model." if hasattr(model, "text_model") else ""


def _without_text_model(state_dict: StateDict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


@dataclass(frozen=True)
class TextEncoderShape:
    """The SD text encoder as the checkpoint shows it, and as a transformers ``CLIPTextModel``.

    ``kind``: ``"clip_l"`` (SD1, OpenAI CLIP ViT-L/14, quick-GELU) or ``"openclip"`` (SD2,
    OpenCLIP ViT-H/14, GELU). ``num_layers`` counts the layers of the model we run: for OpenCLIP
    the file holds one more (``stored_layers``) because SD2 conditions on the penultimate layer.
    ``ldm_prefix``: where the encoder lives in the file. ``runs_all_blocks``: an OpenCLIP model that
    keeps every stored block (SDXL's second encoder, whose pooled output needs the last block).
    """

    kind: TextEncoderKind
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    max_position_embeddings: int
    ldm_prefix: str
    runs_all_blocks: bool = False

    @property
    def drops_last_block(self) -> bool:
        return self.kind == "openclip" and not self.runs_all_blocks

    @property
    def stored_layers(self) -> int:
        return self.num_layers + 1 if self.drops_last_block else self.num_layers

    @property
    def hidden_act(self) -> str:
        return "gelu" if self.kind == "openclip" else "quick_gelu"

    def transformers_config(self) -> dict[str, Any]:
        """``CLIPTextConfig`` keyword arguments. Head count is not in the weights: head dim 64
        (ViT-L/14: 12 heads, ViT-H/14: 16), at least one head."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": max(1, self.hidden_size // 64),
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": 1e-5,
        }

    @classmethod
    def from_transformers_config(cls, config: Any, kind: TextEncoderKind | None = None) -> TextEncoderShape:
        """Shape of a transformers ``CLIPTextConfig``; ``kind`` defaults to what ``hidden_act`` says."""
        kind = kind or text_encoder_kind_of_config(config)
        return cls(kind=kind, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   max_position_embeddings=config.max_position_embeddings,
                   ldm_prefix=OPENCLIP_PREFIX if kind == "openclip" else CLIP_PREFIX)


def text_encoder_kind_of_config(config: Any) -> TextEncoderKind:
    """SD2's OpenCLIP uses exact GELU, SD1's OpenAI CLIP quick-GELU: the one config field that tells."""
    return "openclip" if getattr(config, "hidden_act", "quick_gelu") == "gelu" else "clip_l"


def detect_text_encoder_kind(state_dict: StateDict) -> TextEncoderKind | None:
    """Which SD text encoder a single-file state dict holds, or None when it holds neither."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict):
        return "openclip"
    if any(k.startswith("cond_stage_model.transformer.") for k in state_dict):
        return "clip_l"
    return None


def infer_openclip_shape(state_dict: StateDict, prefix: str = OPENCLIP_PREFIX, *, runs_all_blocks: bool = False,
                         what: str = "SD2 text encoder (OpenCLIP)") -> TextEncoderShape:
    """:class:`TextEncoderShape` of OpenCLIP keys under ``prefix`` (fused ``in_proj``, ``resblocks``)."""
    sd = _strip(state_dict, prefix)
    tokens = _require(sd, "token_embedding.weight", prefix, what)
    positions = _require(sd, "positional_embedding", prefix, what)
    fc1 = _require(sd, "transformer.resblocks.0.mlp.c_fc.weight", prefix, what)
    stored = len(_indices(sd, r"transformer\.resblocks\.(\d+)\."))
    if not runs_all_blocks and stored < 2:
        raise CheckpointError(f"{what}: {stored} transformer block(s) under '{prefix}transformer.resblocks'; SD2 "
                              f"conditions on the penultimate block, so at least 2 are needed")
    return TextEncoderShape(kind="openclip", vocab_size=tokens.shape[0], hidden_size=tokens.shape[1],
                            intermediate_size=fc1.shape[0], num_layers=stored if runs_all_blocks else stored - 1,
                            max_position_embeddings=positions.shape[0], ldm_prefix=prefix,
                            runs_all_blocks=runs_all_blocks)


def infer_clip_shape(state_dict: StateDict, prefix: str = CLIP_PREFIX, *,
                     what: str = "SD1 text encoder (CLIP-L)") -> TextEncoderShape:
    """:class:`TextEncoderShape` of transformers-named CLIP keys under ``prefix`` (ends in ``text_model.``)."""
    sd = _strip(state_dict, prefix)
    tokens = _require(sd, "embeddings.token_embedding.weight", prefix, what)
    positions = _require(sd, "embeddings.position_embedding.weight", prefix, what)
    fc1 = _require(sd, "encoder.layers.0.mlp.fc1.weight", prefix, what)
    layers = len(_indices(sd, r"encoder\.layers\.(\d+)\."))
    return TextEncoderShape(kind="clip_l", vocab_size=tokens.shape[0], hidden_size=tokens.shape[1],
                            intermediate_size=fc1.shape[0], num_layers=layers,
                            max_position_embeddings=positions.shape[0], ldm_prefix=prefix)


def infer_text_encoder_shape(state_dict: StateDict) -> TextEncoderShape:
    """Read a :class:`TextEncoderShape` from an SD1/SD2 single-file state dict (CLIP-L or OpenCLIP keys)."""
    kind = detect_text_encoder_kind(state_dict)
    if kind == "openclip":
        return infer_openclip_shape(state_dict, OPENCLIP_PREFIX)
    if kind == "clip_l":
        # Very old SD1 files lack the ``text_model.`` level; keep whichever the file has.
        prefix = CLIP_PREFIX if any(k.startswith(CLIP_PREFIX) for k in state_dict) else "cond_stage_model.transformer."
        return infer_clip_shape(state_dict, prefix)
    raise CheckpointError("no text encoder: neither 'cond_stage_model.transformer.*' (SD1 CLIP-L) nor "
                          "'cond_stage_model.model.*' (SD2 OpenCLIP) keys")


def _clip_modules(shape: TextEncoderShape) -> list[_Module]:
    modules = [
        _Module("embeddings.token_embedding.", "embeddings.token_embedding.", _WEIGHT),
        _Module("embeddings.position_embedding.", "embeddings.position_embedding.", _WEIGHT),
        _Module("final_layer_norm.", "final_layer_norm.", _WEIGHT_BIAS),
    ]
    modules += [_Module(f"encoder.layers.{i}.", f"encoder.layers.{i}.", _CLIP_LAYER_PARTS)
                for i in range(shape.num_layers)]
    return modules


def clip_ldm_to_diffusers(state_dict: StateDict, shape: TextEncoderShape, *, hf_prefix: str = "") -> Converted:
    """SD1 CLIP-L keys (``cond_stage_model.transformer.text_model.*``) -> ``CLIPTextModel`` keys,
    prefixed with ``hf_prefix`` (see :func:`transformers_text_prefix`). ``position_ids`` (a buffer
    some files carry, sometimes damaged) is reported unused: the model makes its own."""
    out, used, unused = _rename(state_dict, _clip_modules(shape), to_diffusers=True, src_prefix=shape.ldm_prefix,
                                dst_prefix=hf_prefix)
    return Converted(out, frozenset(used), tuple(unused))


def clip_diffusers_to_ldm(state_dict: StateDict, shape: TextEncoderShape) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` state dict (with or without ``text_model.``) -> SD1 single-file keys."""
    out, _, unused = _rename(_without_text_model(state_dict), _clip_modules(shape), to_diffusers=False,
                             src_prefix="", dst_prefix=shape.ldm_prefix)
    _refuse_unplaced(unused, "SD1 text encoder")
    return out


# OpenCLIP block -> transformers CLIPEncoderLayer, for the unfused tensors.
_OPENCLIP_LAYER_PARTS = (
    ("ln_1.", "layer_norm1."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_OPENCLIP_TOP = (
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.weight", "final_layer_norm.weight"),
    ("ln_final.bias", "final_layer_norm.bias"),
)


def openclip_ldm_to_diffusers(state_dict: StateDict, shape: TextEncoderShape, *, hf_prefix: str = "") -> Converted:
    """SD2 OpenCLIP keys (``cond_stage_model.model.*``) -> ``CLIPTextModel`` keys with
    ``shape.num_layers`` layers (the file's last block left out).

    The fused attention input projection ``attn.in_proj_weight`` ``[3D, D]`` is split into q, k, v
    (in that order). Unused (kept by the caller): the last block, ``text_projection``,
    ``logit_scale`` and anything else under the prefix.
    """
    p = shape.ldm_prefix
    what = "SD2 text encoder (OpenCLIP)"
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(ldm_name: str) -> torch.Tensor:
        used.add(p + ldm_name)
        if p + ldm_name not in state_dict:
            raise CheckpointError(f"{what}: key '{p}{ldm_name}' is missing; the checkpoint is incomplete")
        return state_dict[p + ldm_name]

    for ldm_name, hf_name in _OPENCLIP_TOP:
        out[hf_prefix + hf_name] = take(ldm_name)
    for i in range(shape.num_layers):
        block, layer = f"transformer.resblocks.{i}.", f"{hf_prefix}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            # clone: views of one storage would make the state dict unsaveable by safetensors.
            q, k, v = (t.clone() for t in take(f"{block}attn.in_proj_{kind}").chunk(3, dim=0))
            out[f"{layer}self_attn.q_proj.{kind}"] = q
            out[f"{layer}self_attn.k_proj.{kind}"] = k
            out[f"{layer}self_attn.v_proj.{kind}"] = v
            for ldm_part, hf_part in _OPENCLIP_LAYER_PARTS:
                out[f"{layer}{hf_part}{kind}"] = take(f"{block}{ldm_part}{kind}")
    unused = tuple(k for k in state_dict if k.startswith(p) and k not in used)
    return Converted(out, frozenset(used), unused)


def openclip_diffusers_to_ldm(state_dict: StateDict, shape: TextEncoderShape, *,
                              kept: StateDict | None = None) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` state dict -> the complete SD2 OpenCLIP key set of a single file.

    The tensors our model does not hold (the last block, ``text_projection``, ``logit_scale``) come
    from ``kept`` (the unused keys of the file the model was loaded from). Those ``kept`` lacks are
    made up, with a warning-worthy but harmless meaning, because SD2 never reads them: the last
    block as a copy of the model's last layer, ``text_projection`` as identity, ``logit_scale`` as
    CLIP's initial ``log(1/0.07)``; a file without them would load back one layer short.
    """
    sd = _without_text_model(state_dict)
    kept = kept or {}
    p = shape.ldm_prefix
    what = "SD2 text encoder"
    expected = {hf for _, hf in _OPENCLIP_TOP}
    out: dict[str, torch.Tensor] = {p + ldm: sd[hf] for ldm, hf in _OPENCLIP_TOP if hf in sd}

    def write_block(block_index: int, layer_index: int) -> None:
        block, layer = f"{p}transformer.resblocks.{block_index}.", f"encoder.layers.{layer_index}."
        for kind in ("weight", "bias"):
            names = [f"{layer}self_attn.{x}_proj.{kind}" for x in ("q", "k", "v")]
            names += [f"{layer}{hf_part}{kind}" for _, hf_part in _OPENCLIP_LAYER_PARTS]
            missing = [n for n in names if n not in sd]
            if missing:
                raise CheckpointError(f"{what}: transformers key '{missing[0]}' is missing; the model has fewer "
                                      f"layers than its shape ({shape.num_layers})")
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([sd[n] for n in names[:3]], dim=0)
            for (ldm_part, _), name in zip(_OPENCLIP_LAYER_PARTS, names[3:]):
                out[f"{block}{ldm_part}{kind}"] = sd[name]
            expected.update(names)

    for i in range(shape.num_layers):
        write_block(i, i)
    _refuse_unplaced(sorted(set(sd) - expected), what)

    last = f"{p}transformer.resblocks.{shape.num_layers}."
    last_keys = {k: v for k, v in kept.items() if k.startswith(last)}
    if not shape.drops_last_block:
        pass  # the model holds every block the file stores
    elif last_keys:
        out.update(last_keys)
    else:
        before = dict(out)
        write_block(shape.num_layers, shape.num_layers - 1)
        out.update({k: v.clone() for k, v in out.items() if k not in before})
    reference = sd["embeddings.token_embedding.weight"]
    for name, make in (
        ("text_projection", lambda: torch.eye(shape.hidden_size, dtype=reference.dtype, device=reference.device)),
        ("logit_scale", lambda: torch.tensor(math.log(1 / 0.07), dtype=reference.dtype, device=reference.device)),
    ):
        out[p + name] = kept[p + name] if p + name in kept else make()
    return out


def placeholder_openclip_keys(shape: TextEncoderShape) -> list[str]:
    """The single-file keys :func:`openclip_diffusers_to_ldm` makes up when nothing was kept."""
    if not shape.drops_last_block:
        return [shape.ldm_prefix + "text_projection", shape.ldm_prefix + "logit_scale"]
    last = f"{shape.ldm_prefix}transformer.resblocks.{shape.num_layers}."
    parts = ["attn.in_proj_weight", "attn.in_proj_bias"] + [f"{ldm}{kind}" for ldm, _ in _OPENCLIP_LAYER_PARTS
                                                             for kind in ("weight", "bias")]
    return [last + part for part in parts] + [shape.ldm_prefix + "text_projection", shape.ldm_prefix + "logit_scale"]


def text_encoder_ldm_to_diffusers(state_dict: StateDict, shape: TextEncoderShape, *, hf_prefix: str = ""
                                  ) -> Converted:
    """Dispatch to :func:`clip_ldm_to_diffusers` or :func:`openclip_ldm_to_diffusers` by ``shape.kind``."""
    if shape.kind == "openclip":
        return openclip_ldm_to_diffusers(state_dict, shape, hf_prefix=hf_prefix)
    return clip_ldm_to_diffusers(state_dict, shape, hf_prefix=hf_prefix)


def text_encoder_diffusers_to_ldm(state_dict: StateDict, shape: TextEncoderShape, *,
                                  kept: StateDict | None = None) -> dict[str, torch.Tensor]:
    """Dispatch to :func:`clip_diffusers_to_ldm` or :func:`openclip_diffusers_to_ldm` by ``shape.kind``."""
    if shape.kind == "openclip":
        return openclip_diffusers_to_ldm(state_dict, shape, kept=kept)
    return clip_diffusers_to_ldm(state_dict, shape)
