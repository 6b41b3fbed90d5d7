"""Gemma-2 (Lumina-Image 2.0's text encoder, ``--gemma2``) as a transformers ``Gemma2Model``.

Accepted, all local:

* a single ``.safetensors`` file with the encoder under any prefix: ``Gemma2Model`` keys
  (``embed_tokens.weight``, ``layers.N.self_attn.q_proj.weight``, ``norm.weight``),
  ``Gemma2ForCausalLM`` keys (``model.``; ``lm_head`` ignored), or the ComfyUI / Neta-Lumina all-in-one
  layout (``text_encoders.gemma2_2b.transformer.model.``); fp32/bf16/fp16/fp8 weights;
* a transformers folder (``config.json`` + weights), e.g. a copy of ``google/gemma-2-2b``.

A single file shows the vocabulary, width, depth, MLP width and the query/key row counts; the head
dim cannot be seen and is Gemma-2's 256 (2B and 9B), the rest (soft-capping, sliding window, RoPE
theta, norm eps, activation) are gemma-2-2b's values. A file that is not a Gemma-2 encoder gets a
one-line :class:`CheckpointError` saying what it looks like.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import Gemma2Config, Gemma2Model

from library.families.dit_layers import count_numbered_blocks
from library.families.sd.checkpoint.common import CheckpointError
from library.families.sd.loading import read_checkpoint
from library.families.text_encoder_files import describe_state_dict, find_prefixes

logger = logging.getLogger(__name__)

GEMMA2_HEAD_DIM = 256
#: gemma-2-2b's values of what the weights cannot show
GEMMA2_DEFAULTS = dict(head_dim=GEMMA2_HEAD_DIM, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, sliding_window=4096, max_position_embeddings=8192,
                       rope_theta=10000.0, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                       attention_bias=False, attention_dropout=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)

_ANCHOR = "embed_tokens.weight"
_LAYER0 = "layers.0.self_attn.q_proj.weight"
_HARMLESS = ("lm_head.weight", "logit_scale", "spiece_model")


def gemma2_config_from_state_dict(state_dict, prefix: str, source: object) -> Gemma2Config:
    """A ``Gemma2Config`` from the shapes under ``prefix`` (see the module docstring)."""
    def need(name: str) -> torch.Tensor:
        if prefix + name not in state_dict:
            raise CheckpointError(f"{source}: Gemma-2 key '{prefix}{name}' is missing; the file is incomplete")
        return state_dict[prefix + name]

    vocab, hidden = need(_ANCHOR).shape
    q_rows, k_rows = need(_LAYER0).shape[0], need("layers.0.self_attn.k_proj.weight").shape[0]
    if q_rows % GEMMA2_HEAD_DIM or k_rows % GEMMA2_HEAD_DIM:
        raise CheckpointError(f"{source}: q/k projections have {q_rows}/{k_rows} rows, not multiples of Gemma-2's head "
                              f"dim {GEMMA2_HEAD_DIM}; give --gemma2 as a transformers folder with its config.json")
    try:
        layers = count_numbered_blocks({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)},
                                       "layers", "Gemma-2")
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return Gemma2Config(vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
                        intermediate_size=int(need("layers.0.mlp.gate_proj.weight").shape[0]),
                        num_attention_heads=q_rows // GEMMA2_HEAD_DIM, num_key_value_heads=k_rows // GEMMA2_HEAD_DIM,
                        **GEMMA2_DEFAULTS)


def _choose_prefix(prefixes: list[str], path: Path) -> str:
    if len(prefixes) == 1:
        return prefixes[0]
    gemma = [p for p in prefixes if "gemma" in p]
    if len(gemma) == 1:
        return gemma[0]
    raise CheckpointError(f"{path}: holds several Gemma-2-like encoders (under {', '.join(map(repr, prefixes))}); "
                          "extract the one you mean into its own file")


def load_gemma2(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                mmap: bool = True) -> Gemma2Model:
    """The Gemma-2 encoder of ``--gemma2`` (file or folder), weights cast to ``dtype`` on ``device``, eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--gemma2 {path}: no such file or folder (nothing is downloaded)")
    if path.is_dir():
        return _load_folder(path, dtype, device)
    state_dict = read_checkpoint(path, mmap=mmap)
    prefixes = find_prefixes(state_dict, _ANCHOR, also=_LAYER0)
    if not prefixes:
        raise CheckpointError(f"{path} is not a Gemma-2 text encoder (--gemma2): it looks like "
                              f"{describe_state_dict(state_dict)}; a Gemma-2 file has '{_ANCHOR}' and '{_LAYER0}' keys")
    prefix = _choose_prefix(prefixes, path)
    config = gemma2_config_from_state_dict(state_dict, prefix, path)
    with init_empty_weights(include_buffers=False):
        model = Gemma2Model(config)
    own = model.state_dict()
    tensors = {k: state_dict[prefix + k] for k in own if prefix + k in state_dict}
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: the Gemma-2 encoder lacks {len(missing)} tensors, e.g. {missing[:3]}; the file "
                              "is incomplete or of another model")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{path}: {prefix}{key} has shape {list(value.shape)}, expected "
                                  f"{list(own[key].shape)} for the configuration read from the file")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=True, assign=True)
    unused = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in own
              and not k.endswith(_HARMLESS)]
    if unused:
        logger.warning("%s: %d tensors are not part of the Gemma-2 encoder and are ignored, e.g. %s", path, len(unused),
                       unused[:3])
    logger.info("loaded Gemma-2 from %s (width %d, %d layers, %d/%d heads%s)", path, config.hidden_size,
                config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                f", under '{prefix}'" if prefix else "")
    return model.to(device).eval()


def _load_folder(path: Path, dtype: torch.dtype, device: str | torch.device) -> Gemma2Model:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"--gemma2 {path} is a folder without config.json; give the .safetensors file or the "
                              "encoder's transformers folder")
    try:
        model = Gemma2Model.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--gemma2 {path}: cannot load a Gemma-2 folder ({str(e).splitlines()[0]})") from e
    return model.to(device).eval()
