"""New tokens for textual inversion: added to a tokenizer, looked up from a separate trained table.

A text encoder's token table (``nn.Embedding`` [V, D]) is not resized. Instead
:class:`AddedTokenEmbedding` replaces it: it holds the *same* weight Parameter (so the text
encoder's state-dict keys and tensors are unchanged) and looks ids ``>= first_new_id`` up in a
trained ``[n, D]`` table that lives outside the text encoder (:class:`TokenVectors`). So:

* the original rows are provably untouched: that weight never requires a gradient and is not in
  the optimizer (no zero-the-gradient-and-restore dance, which weight decay would defeat);
* the optimizer state is ``n x D`` per encoder, not ``V x D``;
* the trained table keeps its own dtype (float32 under mixed precision) while the frozen encoder
  runs in the ``--mixed_precision`` dtype; looked-up vectors are cast to the table's dtype.

Token names follow the embedding-file convention of ``gen_img.py``
(:mod:`library.generation.textual_inversion`): ``word``, ``word1``, ... ``word{n-1}``.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from library.args import ArgumentError
from library.generation.textual_inversion import _known_token as is_known_token

logger = logging.getLogger(__name__)


def token_names(token_string: str, num_vectors: int) -> list[str]:
    """``("sks", 3) -> ["sks", "sks1", "sks2"]``: the tokens of one embedding, in vector order."""
    return [token_string] + [f"{token_string}{i}" for i in range(1, num_vectors)]


def check_token_string(token_string: str | None) -> None:
    """``--token_string`` must be one word (it becomes the embedding file's name in ``gen_img.py``)."""
    if not token_string:
        raise ArgumentError("--token_string is required: the new word the embedding is trained for (e.g. zxqtoy)")
    if re.search(r"\s", token_string) or re.search(r"[\\/]", token_string):
        raise ArgumentError(f"--token_string {token_string!r} must be one word without spaces or slashes: it is "
                            "written into captions and prompts and names the embedding file")


def add_new_tokens(tokenizer, names: Sequence[str], *, which: str = "the tokenizer") -> int:
    """Add ``names`` to ``tokenizer``; return the id of the first (the ids are consecutive).

    A name the tokenizer already knows (a vocabulary entry, an added token, or a word that is one
    token, like ``cat``) is refused with an :class:`ArgumentError`: the new vector would silently
    take over that word in every caption and prompt, and ``gen_img.py`` refuses such files.
    """
    for name in names:
        if is_known_token(tokenizer, name):
            raise ArgumentError(f"--token_string: {name!r} is already a token of {which} (a word it knows, or an "
                                "added token); choose a made-up word, e.g. 'zxq' + your subject")
    added = tokenizer.add_tokens(list(names))
    ids = tokenizer.convert_tokens_to_ids(list(names))
    if added != len(names) or ids != list(range(ids[0], ids[0] + len(names))):
        raise ArgumentError(f"--token_string: {which} did not add {list(names)} as new consecutive tokens "
                            f"(added {added}, ids {ids}); choose another token string")
    return ids[0]


class TokenVectors(nn.Module):
    """The trained vectors: one ``[n, D_i]`` Parameter per text encoder, named after its key in the
    embedding file (``emb_params``; SDXL ``clip_l``, ``clip_g``), so ``state_dict()`` (and the
    accelerate state) holds exactly what the file holds."""

    def __init__(self, tables: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.keys = list(tables)
        for key, table in tables.items():
            self.register_parameter(key, nn.Parameter(table.detach().clone().float()))

    def tables(self) -> list[nn.Parameter]:
        return [getattr(self, key) for key in self.keys]


class AddedTokenEmbedding(nn.Embedding):
    """A token table whose ids ``>= first_new_id`` read row ``id - first_new_id`` of a trained table.

    ``base``'s weight Parameter itself is reused (same object, same state-dict key ``weight``).
    ``vectors`` (a :class:`TokenVectors`) and ``key`` name the trained table; the module is kept as
    a plain reference, not a sub-module, so the text encoder's ``.to()``/``requires_grad_`` and its
    state dict never touch it. Ids at or above ``first_new_id + n`` are out of range (clamped).
    """

    def __init__(self, base: nn.Embedding, first_new_id: int, vectors: TokenVectors, key: str) -> None:
        super().__init__(base.num_embeddings, base.embedding_dim, padding_idx=base.padding_idx,
                         max_norm=base.max_norm, norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                         sparse=base.sparse, _weight=base.weight, _freeze=not base.weight.requires_grad)
        self.weight = base.weight  # the very same Parameter: the encoder's tensors are not copied
        self.first_new_id = int(first_new_id)
        self.key = key
        object.__setattr__(self, "_vectors", vectors)  # a reference, not a registered sub-module

    @property
    def vectors(self) -> torch.Tensor:
        return getattr(self._vectors, self.key)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        # No host sync: both lookups always run; the new-row gather is [B, T, D], tiny next to the encoder.
        old = F.embedding(input_ids.masked_fill(is_new, 0), self.weight, self.padding_idx, self.max_norm,
                          self.norm_type, self.scale_grad_by_freq, self.sparse)
        table = self.vectors
        rows = (input_ids - self.first_new_id).clamp(0, table.shape[0] - 1)
        new = F.embedding(rows, table).to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, added tokens from {self.first_new_id}: {self.key}"


def install(text_encoder: nn.Module, first_new_id: int, vectors: TokenVectors, key: str) -> AddedTokenEmbedding:
    """Put an :class:`AddedTokenEmbedding` in place of ``text_encoder``'s input embeddings."""
    base = text_encoder.get_input_embeddings()
    if isinstance(base, AddedTokenEmbedding):
        raise RuntimeError("this text encoder already has added-token embeddings installed")
    embedding = AddedTokenEmbedding(base, first_new_id, vectors, key)
    text_encoder.set_input_embeddings(embedding)
    return embedding


def init_word_vectors(tokenizer, weight: torch.Tensor, init_word: str, num_vectors: int) -> torch.Tensor:
    """``--init_word``: its token embeddings (rows of ``weight``) repeated over ``num_vectors``
    (vector ``i`` = the embedding of init token ``i mod k``), float32 ``[num_vectors, D]``."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise ArgumentError(f"--init_word {init_word!r} gives no tokens; give a word such as 'toy' or 'painting'")
    if any(i >= weight.shape[0] for i in ids):
        raise ArgumentError(f"--init_word {init_word!r} contains a token without an embedding row; use plain words")
    if len(ids) > num_vectors:
        logger.warning("--init_word %r has %d tokens but --num_vectors_per_token is %d: only the first %d are used",
                       init_word, len(ids), num_vectors, num_vectors)
    elif 1 < len(ids) != num_vectors:
        logger.warning("--init_word %r has %d tokens for %d vectors: the tokens are repeated in order", init_word,
                       len(ids), num_vectors)
    rows = [ids[i % len(ids)] for i in range(num_vectors)]
    return weight.detach()[rows].float().clone()


def random_vectors(weight: torch.Tensor, num_vectors: int, generator: torch.Generator) -> torch.Tensor:
    """Without ``--init_word``: vectors drawn per dimension from a normal distribution with the mean
    and standard deviation of the existing rows (so they have the size of real token embeddings),
    from ``generator`` (seeded from ``--seed``, the training's random stream is not touched)."""
    table = weight.detach().float()
    mean, std = table.mean(dim=0), table.std(dim=0)
    noise = torch.randn((num_vectors, table.shape[1]), generator=generator)
    return mean + std * noise
