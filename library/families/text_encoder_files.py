"""Text encoders from the separate files users have: CLIP-L (``--clip_l``) and T5-XXL (``--t5xxl``).

Family-agnostic (FLUX.1 uses CLIP-L + T5-XXL, SD3 adds CLIP-G): each loader finds the encoder in
the file whatever prefix it sits under, reads the architecture from tensor shapes, and builds the
transformers model with the file's tensors assigned directly (no random init of billions of
weights). Files as they come:

- CLIP (``clip_l.safetensors``): transformers naming ``text_model.embeddings...``,
  ``text_model.encoder.layers.N...``, ``text_model.final_layer_norm...``, optional
  ``text_projection.weight`` / ``logit_scale`` / ``...position_ids``; possibly under
  ``cond_stage_model.transformer.`` or ``text_encoders.clip_l.transformer.`` (ComfyUI all-in-one
  files), or without ``text_model.`` (saved by transformers 5).
- T5 (``t5xxl_fp16.safetensors``): transformers naming ``shared.weight``, ``encoder.block.N.layer...``,
  ``encoder.final_layer_norm.weight``; possibly under ``text_encoders.t5xxl.transformer.``;
  fp32/fp16/bf16 or fp8 (``float8_e4m3fn``, also ComfyUI's "scaled" fp8 with ``*.scale_weight``).

A file that is not the expected encoder gets a one-line :class:`CheckpointError` saying what it
looks like (:func:`describe_state_dict`). Tensors the model does not take are logged, never
dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from library.families.sd.checkpoint import (
    CheckpointError,
    StateDict,
    TextEncoderShape,
    clip_ldm_to_diffusers,
    infer_clip_shape,
    transformers_text_prefix,
)
from library.families.sd.loading import read_checkpoint

logger = logging.getLogger(__name__)

ClipKind = Literal["clip_l", "clip_g"]

# ------------------------------------------------------------------------------------------------
# What a file holds (for error messages)
# ------------------------------------------------------------------------------------------------

_T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_CLIP_ANCHOR = "embeddings.token_embedding.weight"
_CLIP_LAYER0 = "encoder.layers.0.self_attn.q_proj.weight"
_AE_ANCHORS = ("encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")


def other_model_hint(state_dict: StateDict) -> str:
    """`` It looks like <kind>: <what to do>.`` for a DiT or checkpoint file given to the wrong
    trainer or flag (the loaders' :class:`CheckpointError` ends with it); the loader of each family
    calls it only after its own keys were not found, so its own family never matches."""
    keys = list(state_dict)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k
           for k in keys):
        return " It looks like a LoRA: pass it with --network_weights."
    if any(k.endswith("distilled_guidance_layer.in_proj.bias") for k in keys):
        return " It looks like a Chroma DiT: use flux_train_network.py --model_type chroma."
    if has("double_blocks.", "model.diffusion_model.double_blocks."):
        return " It looks like a FLUX.1 DiT: use flux_train_network.py."
    if has("joint_blocks.", "model.diffusion_model.joint_blocks."):
        return " It looks like an SD3 model: use sd3_train_network.py."
    if has("cap_embedder.", "model.diffusion_model.cap_embedder."):
        return " It looks like a Lumina-Image 2.0 DiT: use lumina_train_network.py."
    if has("conditioner.embedders."):
        return " It looks like an SDXL checkpoint: use sdxl_train_network.py."
    if has("cond_stage_model."):
        return " It looks like an SD 1.x/2.x checkpoint: use train_network.py."
    if has("model.diffusion_model.input_blocks.", "input_blocks."):
        return " It looks like an SD/SDXL checkpoint: use train_network.py or sdxl_train_network.py."
    return f" It looks like {describe_state_dict(state_dict)}."


def describe_state_dict(state_dict: StateDict) -> str:
    """A few words on what kind of model a state dict holds ("a LoRA/network file", "a FLUX.1 DiT
    (double_blocks.*)", ...), for errors about a file given to the wrong flag."""
    keys = list(state_dict)

    def has(pred: Callable[[str], bool]) -> bool:
        return any(pred(k) for k in keys)

    found: list[str] = []
    if has(lambda k: k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k):
        found.append("a LoRA/network file")
    if has(lambda k: k.startswith("double_blocks.") or ".double_blocks." in k):
        found.append("a FLUX.1 DiT (double_blocks.*)")
    if has(lambda k: k.startswith("joint_blocks.") or ".joint_blocks." in k):
        found.append("an SD3 MMDiT (joint_blocks.*)")
    if has(lambda k: "input_blocks." in k or k.startswith("model.diffusion_model.")):
        found.append("an SD/SDXL U-Net checkpoint")
    if has(lambda k: k.endswith(_T5_ANCHOR)):
        found.append("a T5 text encoder (encoder.block.*)")
    if has(lambda k: k.endswith(_CLIP_ANCHOR)):
        found.append("a CLIP text encoder (embeddings.token_embedding.*)")
    if has(lambda k: k.endswith("transformer.resblocks.0.attn.in_proj_weight")):
        found.append("an OpenCLIP text encoder (transformer.resblocks.*)")
    if has(lambda k: k.endswith(_AE_ANCHORS)):
        found.append("an autoencoder/VAE (encoder.down*)")
    if found:
        return ", ".join(found)
    top = sorted({k.split(".")[0] for k in keys})
    shown = ", ".join(top[:8]) + (" ..." if len(top) > 8 else "")
    return f"an unknown model (top-level names: {shown or 'none'})"


def find_prefixes(state_dict: StateDict, anchor: str, *, also: str | None = None) -> list[str]:
    """Every ``P`` such that ``P + anchor`` is a key (and ``P + also`` too, when given), sorted."""
    prefixes = {k[: -len(anchor)] for k in state_dict if k.endswith(anchor)}
    if also is not None:
        prefixes = {p for p in prefixes if p + also in state_dict}
    return sorted(prefixes)


def _choose_prefix(prefixes: list[str], path: Path, what: str, preferred: str) -> str:
    """One prefix; several (an all-in-one file with two CLIPs) are told apart by ``preferred``."""
    if len(prefixes) == 1:
        return prefixes[0]
    matching = [p for p in prefixes if preferred in p]
    if len(matching) == 1:
        return matching[0]
    raise CheckpointError(f"{path}: holds several {what} models (under {', '.join(repr(p) for p in prefixes)}) "
                          f"and none is named '{preferred}'; extract the one you mean into its own file")


def _report_unused(path: Path, what: str, unused: Iterable[str], *, harmless: tuple[str, ...] = (),
                   other_models: int = 0) -> None:
    """Log the file's tensors the model did not take: a warning for unexpected ones (a variant this
    loader does not know would lose weights), info for the known-harmless ones."""
    unused = sorted(unused)
    expected = [k for k in unused if any(re.search(h, k) for h in harmless)]
    surprising = [k for k in unused if k not in expected]
    if surprising:
        shown = ", ".join(surprising[:5]) + (f" (+{len(surprising) - 5} more)" if len(surprising) > 5 else "")
        logger.warning("%s: %d tensor(s) are not used by the %s and are ignored: %s", path, len(surprising), what,
                       shown)
    if expected:
        logger.info("%s: not used by the %s (as expected): %s", path, what, ", ".join(expected[:5])
                    + (" ..." if len(expected) > 5 else ""))
    if other_models:
        logger.info("%s: %d tensor(s) of other models in the file are ignored by the %s loader", path,
                    other_models, what)


def _check_path(path: str | os.PathLike, flag: str, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} ({flag} must be a local .safetensors file; nothing is "
                                f"downloaded)")
    return path


# ------------------------------------------------------------------------------------------------
# Assigning tensors to a model built on the meta device
# ------------------------------------------------------------------------------------------------

def _assign(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, path: Path, what: str,
            dtype_of: Callable[[str], torch.dtype], device: str | torch.device,
            allow_missing: tuple[str, ...] = ()) -> None:
    """Load ``state_dict`` into ``model`` (parameters on meta) by assignment, each tensor cast to
    ``dtype_of(name)``. Any parameter left without a tensor (other than ``allow_missing``, tied ones
    the caller fills) is an error naming the first missing key."""
    cast = {k: (v.to(device=device, dtype=dtype_of(k)) if v.is_floating_point() else v.to(device))
            for k, v in state_dict.items()}
    result = model.load_state_dict(cast, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in allow_missing]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: the {what} weights do not fit the architecture read from them (missing "
                              f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}); the file is incomplete or a "
                              f"variant this loader does not know")


def _dequantize(state_dict: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Apply ComfyUI "scaled fp8" factors: ``W = W_fp8 * <module>.scale_weight`` (float32 math).

    Returns the state dict with those weights replaced and the scale keys consumed. Plain fp8
    files (no ``scale_weight``) are returned unchanged; the caller upcasts them.
    """
    scales = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(".scale_weight")}
    if not scales:
        return state_dict, set()
    out = dict(state_dict)
    for scale_key, scale in scales.items():
        weight_key = scale_key[: -len("scale_weight")] + "weight"
        if weight_key in out:
            out[weight_key] = out[weight_key].to(torch.float32) * scale.to(torch.float32)
    consumed = set(scales)
    consumed.update(k for k in state_dict
                    if k == prefix + "scaled_fp8" or (k.startswith(prefix) and k.endswith(".scale_input")))
    return out, consumed


# ------------------------------------------------------------------------------------------------
# CLIP text encoders (CLIP-L; CLIP-G for SD3)
# ------------------------------------------------------------------------------------------------

_CLIP_HARMLESS = (r"position_ids$", r"logit_scale$", r"text_projection(\.weight)?$")


def infer_clip_file_shape(state_dict: StateDict, prefix: str, *, kind: ClipKind = "clip_l") -> TextEncoderShape:
    """:class:`TextEncoderShape` of transformers-named CLIP keys under ``prefix`` (which ends in
    ``text_model.`` or is the outer prefix of a file without that level).

    Heads are not in the weights: the SD rule (head dim 64) applies, as in every OpenAI/OpenCLIP
    text tower (CLIP-L 12 heads, CLIP-G 20). CLIP-G uses exact GELU, CLIP-L quick-GELU; only
    ``kind`` can tell them apart.
    """
    shape = infer_clip_shape(state_dict, prefix, what=f"{kind.upper().replace('_', '-')} text encoder")
    if kind == "clip_g":
        # The SD shape's "openclip" kind carries the GELU activation; all stored blocks run.
        shape = dataclasses.replace(shape, kind="openclip", runs_all_blocks=True)
    return shape


def load_clip_text_encoder(path: str | os.PathLike, *, kind: ClipKind, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu", mmap: bool = True, with_projection: bool = False,
                           flag: str | None = None) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text tower from a single file (any prefix, see the module doc) or a transformers
    folder (``config.json``).

    ``with_projection``: return a ``CLIPTextModelWithProjection`` (its ``pooler_output`` /
    ``text_embeds`` is projected, as SD3 uses); needs ``text_projection.weight`` in the file.
    Otherwise a ``CLIPTextModel`` whose ``pooler_output`` is the final-layer-normed hidden state at
    the first EOS token (what FLUX uses); ``text_projection`` is then reported unused.
    Weights are cast to ``dtype`` on ``device``; ``mmap=False`` reads the file in one go.
    """
    flag = flag or f"--{kind}"
    what = f"{kind.upper().replace('_', '-')} text encoder"
    path = _check_path(path, flag, what)
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    if path.is_dir():
        return _load_folder(path, model_cls, flag, what, dtype, device)

    state_dict = read_checkpoint(path, mmap=mmap)
    prefixes = find_prefixes(state_dict, _CLIP_ANCHOR, also=_CLIP_LAYER0)
    if not prefixes:
        raise CheckpointError(f"{path} is not a {what} ({flag}): it looks like {describe_state_dict(state_dict)}; "
                              f"a CLIP file has '{_CLIP_ANCHOR}' and '{_CLIP_LAYER0}' keys (under text_model.)")
    prefix = _choose_prefix(prefixes, path, "CLIP text", kind)
    shape = infer_clip_file_shape(state_dict, prefix, kind=kind)
    outer = prefix.removesuffix("text_model.")
    projection = state_dict.get(outer + "text_projection.weight")
    config = CLIPTextConfig(**shape.transformers_config())
    if with_projection:
        if projection is None:
            raise CheckpointError(f"{path}: {what} has no '{outer}text_projection.weight', which the projected "
                                  f"pooled output needs; the file is incomplete")
        config.projection_dim = projection.shape[0]

    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    converted = clip_ldm_to_diffusers(state_dict, shape, hf_prefix=transformers_text_prefix(model))
    tensors = dict(converted.state_dict)
    used = set(converted.used)
    if with_projection:
        tensors["text_projection.weight"] = projection
        used.add(outer + "text_projection.weight")
    _assign(model, tensors, path=path, what=what, dtype_of=lambda _: dtype, device=device)
    mine = [k for k in state_dict if k.startswith(outer)]
    _report_unused(path, what, (k for k in mine if k not in used), harmless=_CLIP_HARMLESS,
                   other_models=len(state_dict) - len(mine))
    logger.info("loaded %s from %s (width %d, %d layers%s)", what, path, shape.hidden_size, shape.num_layers,
                f", under '{outer}'" if outer else "")
    return model.to(device).eval()


def load_clip_l(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                mmap: bool = True, with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """CLIP-L (OpenAI ViT-L/14 text tower, quick-GELU) from ``--clip_l``; see :func:`load_clip_text_encoder`."""
    return load_clip_text_encoder(path, kind="clip_l", dtype=dtype, device=device, mmap=mmap,
                                  with_projection=with_projection, flag="--clip_l")


def load_clip_g(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                mmap: bool = True, with_projection: bool = True) -> CLIPTextModel | CLIPTextModelWithProjection:
    """CLIP-G (OpenCLIP ViT-bigG/14 text tower in transformers naming, GELU) from ``--clip_g``."""
    return load_clip_text_encoder(path, kind="clip_g", dtype=dtype, device=device, mmap=mmap,
                                  with_projection=with_projection, flag="--clip_g")


def _load_folder(path: Path, model_cls: type, flag: str, what: str, dtype: torch.dtype,
                 device: str | torch.device) -> torch.nn.Module:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: {flag} is a folder without config.json; give the .safetensors file or the "
                              f"text encoder's own transformers folder")
    try:
        model = model_cls.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a {what} folder ({str(e).splitlines()[0]}); check {flag}") from e
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------
# T5 encoders (T5-XXL v1.1 for FLUX.1 / SD3)
# ------------------------------------------------------------------------------------------------

#: T5 v1.1 values the weights cannot show.
T5_RELATIVE_ATTENTION_MAX_DISTANCE = 128
T5_LAYER_NORM_EPSILON = 1e-6
T5_DROPOUT_RATE = 0.1

_T5_HARMLESS = (r"^decoder\.", r"^lm_head\.")


@dataclass(frozen=True)
class T5Shape:
    """A T5 encoder as its weights show it (full-size T5-XXL: d_model 4096, 24 layers, 64 heads,
    d_kv 64, d_ff 10240, vocab 32128, 32 buckets, gated-GELU)."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    relative_attention_num_buckets: int
    gated: bool

    @property
    def feed_forward_proj(self) -> str:
        return "gated-gelu" if self.gated else "relu"

    def transformers_config(self) -> dict[str, Any]:
        """``T5Config`` keyword arguments; max distance, epsilon and dropout are the T5 v1.1 values."""
        return {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "num_heads": self.num_heads,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": T5_RELATIVE_ATTENTION_MAX_DISTANCE,
            "feed_forward_proj": self.feed_forward_proj,
            "layer_norm_epsilon": T5_LAYER_NORM_EPSILON,
            "dropout_rate": T5_DROPOUT_RATE,
            "is_encoder_decoder": False,
            "use_cache": False,
            "tie_word_embeddings": False,
        }


def _t5_embedding_key(state_dict: StateDict, prefix: str) -> str | None:
    for name in ("shared.weight", "encoder.embed_tokens.weight"):
        if prefix + name in state_dict:
            return prefix + name
    return None


def infer_t5_shape(state_dict: StateDict, prefix: str = "", *, source: object = "T5 encoder") -> T5Shape:
    """Read a :class:`T5Shape` from transformers-named T5 keys under ``prefix`` (shapes only, so
    tensors on ``meta`` work). ``source`` names the file in errors."""

    def need(name: str) -> torch.Tensor:
        if prefix + name not in state_dict:
            raise CheckpointError(f"{source}: T5 key '{prefix}{name}' is missing; the file is incomplete")
        return state_dict[prefix + name]

    embedding_key = _t5_embedding_key(state_dict, prefix)
    if embedding_key is None:
        raise CheckpointError(f"{source}: neither '{prefix}shared.weight' nor '{prefix}encoder.embed_tokens.weight' "
                              f"(the token embedding) is in the file; it is incomplete")
    vocab_size, d_model = state_dict[embedding_key].shape
    buckets, heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").shape
    inner = need("encoder.block.0.layer.0.SelfAttention.q.weight").shape[0]
    if inner % heads:
        raise CheckpointError(f"{source}: q projection has {inner} rows, not a multiple of the {heads} heads the "
                              f"relative attention bias shows; the file is damaged")
    pattern = re.compile(re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    layers = sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: T5 blocks {layers} under '{prefix}encoder.block.N' have gaps")
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = prefix + ff + "wi_0.weight" in state_dict
    d_ff = need(ff + ("wi_0.weight" if gated else "wi.weight")).shape[0]
    return T5Shape(vocab_size=int(vocab_size), d_model=int(d_model), d_kv=inner // heads, num_heads=int(heads),
                   d_ff=int(d_ff), num_layers=len(layers), relative_attention_num_buckets=int(buckets), gated=gated)


def load_t5xxl(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               mmap: bool = True, flag: str = "--t5xxl") -> T5EncoderModel:
    """A T5 encoder (T5-XXL v1.1 or any size/variant) from a single file or a transformers folder.

    The config comes from the shapes (:func:`infer_t5_shape`). fp8 weights are upcast to
    ``dtype`` (scaled fp8 multiplied by their ``scale_weight`` first). With ``dtype=float16`` the
    feed-forward output projections ``wo`` stay float32, as transformers does for T5 (fp16
    overflows there and gives NaN/inf); the model casts activations for them itself.
    The token embedding is one tensor shared by ``shared`` and ``encoder.embed_tokens``.
    """
    what = "T5 text encoder"
    path = _check_path(path, flag, what)
    if path.is_dir():
        return _load_folder(path, T5EncoderModel, flag, what, dtype, device)

    state_dict = read_checkpoint(path, mmap=mmap)
    prefixes = find_prefixes(state_dict, _T5_ANCHOR)
    if not prefixes:
        raise CheckpointError(f"{path} is not a T5 text encoder ({flag}): it looks like "
                              f"{describe_state_dict(state_dict)}; a T5 file has '{_T5_ANCHOR}' keys")
    prefix = _choose_prefix(prefixes, path, "T5", "t5")
    state_dict, consumed = _dequantize(state_dict, prefix)
    shape = infer_t5_shape(state_dict, prefix, source=path)

    with init_empty_weights(include_buffers=False):
        model = T5EncoderModel(T5Config(**shape.transformers_config()))
    own = set(model.state_dict())
    embedding_key = _t5_embedding_key(state_dict, prefix)
    tensors = {"shared.weight": state_dict[embedding_key]}
    used = {embedding_key, *consumed}
    if prefix + "encoder.embed_tokens.weight" in state_dict:
        used.add(prefix + "encoder.embed_tokens.weight")  # the same embedding as shared.weight
    for key in own - {"shared.weight", "encoder.embed_tokens.weight"}:
        if prefix + key in state_dict:
            tensors[key] = state_dict[prefix + key]
            used.add(prefix + key)
    keep_fp32 = dtype == torch.float16
    _assign(model, tensors, path=path, what=what, device=device, allow_missing=("encoder.embed_tokens.weight",),
            dtype_of=lambda k: torch.float32 if keep_fp32 and k.endswith("DenseReluDense.wo.weight") else dtype)
    # One embedding for both names (the file may hold it twice, or once).
    model.encoder.set_input_embeddings(model.shared)
    mine = [k for k in state_dict if k.startswith(prefix)]
    _report_unused(path, what, (k.removeprefix(prefix) for k in mine if k not in used), harmless=_T5_HARMLESS,
                   other_models=len(state_dict) - len(mine))
    logger.info("loaded %s from %s (d_model %d, %d layers, %d heads, %s%s)", what, path, shape.d_model,
                shape.num_layers, shape.num_heads, shape.feed_forward_proj, f", under '{prefix}'" if prefix else "")
    return model.to(device).eval()


def t5_state_dict(model: T5EncoderModel, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """The encoder's tensors in the file layout (``shared.weight`` + ``encoder.*``), each a distinct
    contiguous tensor so safetensors can save them (the embedding is written once, as
    ``shared.weight`` and ``encoder.embed_tokens.weight``, as HF T5 files do)."""
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def clip_state_dict(model: CLIPTextModel | CLIPTextModelWithProjection, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """A CLIP text model's tensors in the file layout: ``text_model.*`` (whatever level the
    transformers version nests modules at) plus ``text_projection.weight`` when the model has one."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        out[prefix + name] = tensor.detach().clone().contiguous()
    return out


__all__ = [
    "ClipKind",
    "T5Shape",
    "clip_state_dict",
    "describe_state_dict",
    "find_prefixes",
    "infer_clip_file_shape",
    "infer_t5_shape",
    "load_clip_g",
    "load_clip_l",
    "load_clip_text_encoder",
    "load_t5xxl",
    "t5_state_dict",
]
