"""Tokenising captions into 77-token chunks and encoding them into SD 1.x/2.x conditioning.

CLIP reads 77 tokens: BOS, up to 75 text tokens, EOS (and padding). ``--max_token_length`` 150 or
225 gives a caption 2 or 3 chunks of 75 text tokens; each chunk goes through the text encoder on
its own and the outputs are joined back into one sequence of ``75 * n + 2`` vectors.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerBase

CHUNK = 77
TEXT_PER_CHUNK = CHUNK - 2


def chunk_count(max_token_length: int | None) -> int:
    """``None``/75 -> 1, 150 -> 2, 225 -> 3 chunks."""
    if max_token_length is None:
        return 1
    if max_token_length not in (75, 150, 225):
        raise ValueError(f"max_token_length must be 75, 150 or 225 (or unset), got {max_token_length}")
    return max_token_length // TEXT_PER_CHUNK


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_token_length: int | None
             ) -> torch.LongTensor:
    """Token ids ``[B, n, 77]`` for ``n = chunk_count(max_token_length)``.

    Each caption is tokenised to ``75n + 2`` ids (BOS, up to ``75n`` text tokens, EOS, padding;
    longer text is truncated), then cut into ``n`` chunks: chunk ``i`` is BOS + ids
    ``[1 + 75i, 1 + 75(i+1))`` + an end token. The end token:

    - SD1 (pad id == EOS id): always EOS.
    - SD2 (pad ``!`` id 0): EOS when the chunk's last text slot holds text (the caption runs to or
      past the chunk end, so the chunk needs its own EOS); otherwise pad, since the chunk's EOS is
      already inside it or the chunk is empty. A chunk that is only padding gets EOS in its first
      slot, so it reads ``[BOS, EOS, pad, ...]``, exactly the encoding of an empty caption (as an
      all-padding chunk already is for SD1).

    With ``n == 1`` the result equals plain 77-token tokenisation.
    """
    n = chunk_count(max_token_length)
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=TEXT_PER_CHUNK * n + 2,
                    return_tensors="pt").input_ids
    return split_chunks(ids, tokenizer, n)


def tokenize_unpadded(tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> torch.LongTensor:
    """``--no_token_padding`` (train_db.py): ids ``[B, 1, L]`` padded only to the longest caption of the
    batch (BOS, up to 75 text tokens, EOS), so the encoder sees no padding beyond it."""
    ids = tokenizer(list(captions), padding="longest", truncation=True, max_length=CHUNK, return_tensors="pt").input_ids
    return ids[:, None, :]


def split_chunks(ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, n: int) -> torch.LongTensor:
    """``[B, 75n + 2]`` ids (BOS, text, EOS, padding) -> ``[B, n, 77]`` chunks as :func:`tokenize` describes."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    batch = ids.shape[0]
    chunks = []
    for i in range(n):
        body = ids[:, 1 + TEXT_PER_CHUNK * i: 1 + TEXT_PER_CHUNK * (i + 1)].clone()
        if pad == eos:
            end = torch.full((batch, 1), eos, dtype=ids.dtype)
        else:
            last = body[:, -1:]
            end = torch.where((last != eos) & (last != pad), eos, pad)
            body[body[:, 0] == pad, 0] = eos
        chunks.append(torch.cat([torch.full((batch, 1), bos, dtype=ids.dtype), body, end], dim=1))
    return torch.stack(chunks, dim=1)


def tokenize_weighted(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_token_length: int | None
                      ) -> tuple[torch.LongTensor, torch.Tensor]:
    """``--weighted_captions``: ids ``[B, n, 77]`` of the captions without the weight syntax, and
    per-token weights ``[B, 75n + 2]`` in the layout :func:`encode` returns (BOS/EOS/padding: 1).

    The ids are chunked exactly as :func:`tokenize` chunks them; each text token carries the
    weight of its span (:func:`library.training.weighted_captions.parse_weighted_caption`).
    """
    from library.training.weighted_captions import weighted_token_ids

    n = chunk_count(max_token_length)
    length = TEXT_PER_CHUNK * n + 2
    ids = torch.full((len(captions), length), tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.ones((len(captions), length), dtype=torch.float32)
    for row, caption in enumerate(captions):
        text_ids, text_weights = weighted_token_ids(tokenizer, caption, TEXT_PER_CHUNK * n)
        ids[row, 0] = tokenizer.bos_token_id
        ids[row, 1:1 + len(text_ids)] = torch.tensor(text_ids, dtype=torch.long)
        ids[row, 1 + len(text_ids)] = tokenizer.eos_token_id
        weights[row, 1:1 + len(text_ids)] = torch.tensor(text_weights, dtype=torch.float32)
    return split_chunks(ids, tokenizer, n), weights


def _text_transformer(text_encoder: CLIPTextModel) -> torch.nn.Module:
    # transformers 4 nests the modules under ``text_model``; transformers 5 does not.
    return getattr(text_encoder, "text_model", text_encoder)


def encode(text_encoder: CLIPTextModel, input_ids: torch.Tensor, *, clip_skip: int | None,
           max_token_length: int | None = None) -> torch.Tensor:
    """Conditioning ``[B, 75n + 2, hidden]`` from token ids ``[B, n, 77]`` (``[B, 77]`` means n = 1).

    Every chunk goes through the text encoder separately. Per chunk, the output is the last layer
    (``clip_skip`` None or 1) or ``hidden_states[-clip_skip]`` passed through the final layer norm
    (``clip_skip`` k > 1: the output of the k-th layer from the end). For SD2 the encoder already
    lacks OpenCLIP's last block, so its last layer is the original penultimate one and ``clip_skip``
    goes further back the same way.

    The chunks are joined as: BOS vector of the first chunk, the 75 middle vectors of every chunk in
    order, end vector (position 76) of the last chunk. ``max_token_length``, when given, must agree
    with ``n``.
    """
    if input_ids.ndim == 2:
        input_ids = input_ids[:, None, :]
    batch, n, length = input_ids.shape
    if length != CHUNK and not (n == 1 and length < CHUNK):  # one shorter chunk: --no_token_padding
        raise ValueError(f"input_ids must have chunks of {CHUNK} tokens, got shape {tuple(input_ids.shape)}")
    if max_token_length is not None and chunk_count(max_token_length) != n:
        raise ValueError(f"input_ids hold {n} chunk(s) but max_token_length={max_token_length} means "
                         f"{chunk_count(max_token_length)}; tokenize and encode with the same max_token_length")
    flat = input_ids.reshape(batch * n, length).to(text_encoder.device)
    if clip_skip is None or clip_skip <= 1:
        hidden = text_encoder(flat).last_hidden_state
    else:
        layers = text_encoder.config.num_hidden_layers
        if clip_skip > layers:
            raise ValueError(f"clip_skip={clip_skip} is more than the text encoder's {layers} layers")
        states = text_encoder(flat, output_hidden_states=True).hidden_states
        hidden = _text_transformer(text_encoder).final_layer_norm(states[-clip_skip])
    return hidden if n == 1 else join_chunks(hidden, batch, n)


def join_chunks(hidden: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """Per-chunk encoder outputs ``[B * n, 77, D]`` -> one sequence ``[B, 75n + 2, D]``: the first
    chunk's BOS vector, the 75 middle vectors of every chunk in order, the last chunk's end vector."""
    hidden = hidden.reshape(batch, n, CHUNK, hidden.shape[-1])
    pieces = [hidden[:, 0, :1]] + [hidden[:, i, 1:-1] for i in range(n)] + [hidden[:, -1, -1:]]
    return torch.cat(pieces, dim=1)
