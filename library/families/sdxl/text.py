"""SDXL text conditioning: two CLIP text encoders, their penultimate layers joined, a pooled vector.

For a batch of captions (token ids ``[B, 2, n, 77]``: one ``[B, n, 77]`` layout per tokenizer, as
:func:`library.families.sd.text.tokenize` makes it):

* each encoder runs every 77-token chunk separately; its *penultimate* layer output (no final layer
  norm: SDXL was trained on ``hidden_states[-2]``, i.e. layer 11 of CLIP-L's 12 and layer 31 of
  bigG's 32) is joined over the chunks as SD's long prompts are (``75n + 2`` vectors);
* the two sequences are concatenated along the channels: ``768 + 1280 = 2048`` at full size;
* the pooled vector is text encoder 2's *last* layer after its final layer norm, read at the first
  EOS token of the first chunk, through ``text_projection`` (SDXL takes it at the first EOS, not
  at the highest token id as transformers' pooling does; the results differ only when a caption
  contains the EOS id itself, but the rule is the model's).

The size/crop part of SDXL's conditioning vector is not text: the family builds it from the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from library.families.sd import text as sd_text
from library.prompt_weights import apply_token_weights


@dataclass
class TextConditioning:
    """One batch's SDXL text conditioning: ``hidden1`` [B, T, D1], ``hidden2`` [B, T, D2], ``pooled`` [B, P]."""

    hidden1: torch.Tensor
    hidden2: torch.Tensor
    pooled: torch.Tensor

    @property
    def context(self) -> torch.Tensor:
        """The U-Net's ``encoder_hidden_states`` [B, T, D1 + D2]."""
        return torch.cat([self.hidden1, self.hidden2.to(self.hidden1.dtype)], dim=-1)

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden1.dtype

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextConditioning:
        return TextConditioning(*(t.to(device=device, dtype=dtype or t.dtype)
                                  for t in (self.hidden1, self.hidden2, self.pooled)))


def tokenize(tokenizer1: PreTrainedTokenizerBase, tokenizer2: PreTrainedTokenizerBase, captions: list[str],
             max_token_length: int | None) -> torch.LongTensor:
    """Token ids ``[B, 2, n, 77]``: the captions through both tokenizers (they differ in padding)."""
    return torch.stack([sd_text.tokenize(tokenizer1, captions, max_token_length),
                        sd_text.tokenize(tokenizer2, captions, max_token_length)], dim=1)


def _penultimate(encoder: torch.nn.Module, ids: torch.Tensor):
    batch, n, length = ids.shape
    output = encoder(ids.reshape(batch * n, length).to(encoder.device), output_hidden_states=True)
    return sd_text.join_chunks(output.hidden_states[-2], batch, n), output


def pooled_output(text_encoder2: CLIPTextModelWithProjection, last_hidden_state: torch.Tensor, ids: torch.Tensor,
                  eos_token_id: int) -> torch.Tensor:
    """Projected last-layer state at the first EOS of chunk 0: ``last_hidden_state`` [B * n, 77, D]
    (after the final layer norm), ``ids`` [B, n, 77]."""
    batch, n, length = ids.shape
    first_chunk = last_hidden_state.reshape(batch, n, length, -1)[:, 0]
    eos = (ids[:, 0] == eos_token_id).int().argmax(dim=1).to(first_chunk.device)
    pooled = first_chunk[torch.arange(batch, device=first_chunk.device), eos]
    return text_encoder2.text_projection(pooled.to(text_encoder2.text_projection.weight.dtype))


def encode(text_encoder1: CLIPTextModel, text_encoder2: CLIPTextModelWithProjection, input_ids: torch.Tensor,
           eos_token_id: int) -> TextConditioning:
    """:class:`TextConditioning` of token ids ``[B, 2, n, 77]`` (see the module docstring)."""
    if input_ids.ndim != 4 or input_ids.shape[1] != 2 or input_ids.shape[-1] != sd_text.CHUNK:
        raise ValueError(f"SDXL input_ids must be [batch, 2, chunks, {sd_text.CHUNK}], got {tuple(input_ids.shape)}")
    hidden1, _ = _penultimate(text_encoder1, input_ids[:, 0])
    hidden2, output2 = _penultimate(text_encoder2, input_ids[:, 1])
    pooled = pooled_output(text_encoder2, output2.last_hidden_state, input_ids[:, 1], eos_token_id)
    return TextConditioning(hidden1, hidden2, pooled)


def encode_weighted(text_encoder1: CLIPTextModel, text_encoder2: CLIPTextModelWithProjection,
                    ids1: torch.Tensor, ids2: torch.Tensor, weights: torch.Tensor, eos_token_id: int,
                    emb_normalize_mode: str = "original") -> TextConditioning:
    """:func:`encode` with per-token weights ``[B, 75n + 2]`` applied to each encoder's sequence
    (each renormalised on its own); the pooled vector is left unweighted."""
    cond = encode(text_encoder1, text_encoder2, torch.stack([ids1, ids2], dim=1), eos_token_id)
    return TextConditioning(apply_token_weights(cond.hidden1, weights, emb_normalize_mode),
                            apply_token_weights(cond.hidden2, weights, emb_normalize_mode), cond.pooled)


def size_ids(original_hw: torch.Tensor, crop_top_left: torch.Tensor, target_hw: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning ``[B, 6]``: original (h, w), crop (top, left), target (h, w), in pixels."""
    return torch.cat([original_hw, crop_top_left, target_hw], dim=1)
