"""Textual inversion embeddings for ``gen_img.py`` (``--textual_inversion_embeddings``).

A file holds ``n`` vectors of the text encoder's width: ``emb_params`` [n, D] (kohya's
``.safetensors``/``.pt``) or A1111's ``{"string_to_param": {"*": [n, D]}}`` (``.pt``). The token
word is the file name without its suffix (``my_style.pt`` -> ``my_style``). Its ``n`` tokens
``name``, ``name1`` ... ``name{n-1}`` are added to the tokenizer, the text encoder's token table
grows to match and the vectors are written into the new rows. In prompts, the word ``name`` expands
to all ``n`` tokens (:meth:`Embeddings.expand`) before encoding, so weights like ``(name:1.2)`` apply
to every vector.

A token word must be new: it must not be an added token already (two files with the same name)
nor a single token the tokenizer already knows (``cat.pt`` would hijack the word "cat"); rename
the file then.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class EmbeddingError(ValueError):
    """An embedding file cannot be used; the message names the file and the fix."""


def read_embedding(path: str | Path) -> torch.Tensor:
    """The vectors [n, D] of an embedding file (float32)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: file not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: cannot read it ({e})") from None
    vectors = None
    if isinstance(data, dict) and "emb_params" in data:
        vectors = data["emb_params"]
    elif isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        params = data["string_to_param"]
        vectors = params.get("*", next(iter(params.values()), None))
    if not isinstance(vectors, torch.Tensor):
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: no embedding found (expected 'emb_params' or "
                             f"A1111 'string_to_param'; the file has: {keys}). SDXL embeddings (clip_l/clip_g) need "
                             "an SDXL model")
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: expected vectors [n, dim], got shape "
                             f"{tuple(vectors.shape)}")
    return vectors.detach().float()


@dataclass
class Embeddings:
    """Loaded embeddings: token word -> its token strings."""

    tokens: dict[str, list[str]] = field(default_factory=dict)

    def expand(self, prompt: str) -> str:
        """Replace each embedding word in ``prompt`` by all of its tokens (whole words only)."""
        for word, tokens in self.tokens.items():
            if len(tokens) > 1:
                prompt = re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", " ".join(tokens), prompt)
        return prompt


def _known_token(tokenizer, word: str) -> bool:
    if word in tokenizer.get_vocab():
        return True
    pieces = tokenizer.tokenize(word)
    return len(pieces) == 1 and pieces[0] in tokenizer.get_vocab() and pieces[0].replace("</w>", "") == word.lower()


def load_embeddings(paths: list[str], tokenizer, text_encoder) -> Embeddings:
    """Add every embedding file's tokens to ``tokenizer`` and its vectors to ``text_encoder``."""
    result = Embeddings()
    if not paths:
        return result
    table = text_encoder.get_input_embeddings()
    width = table.weight.shape[1]
    planned: list[tuple[list[str], torch.Tensor, Path]] = []
    for p in paths:
        path = Path(p)
        vectors = read_embedding(path)
        if vectors.shape[1] != width:
            raise EmbeddingError(f"--textual_inversion_embeddings {path}: vectors have width {vectors.shape[1]} but the "
                                 f"text encoder has {width} (an embedding for another model: SD1 768, SD2 1024)")
        word = path.stem
        if not word or re.search(r"\s", word):
            raise EmbeddingError(f"--textual_inversion_embeddings {path}: the file name is the token word and must "
                                 "not contain spaces; rename the file")
        names = [word] + [f"{word}{i}" for i in range(1, vectors.shape[0])]
        clash = [n for n in names if _known_token(tokenizer, n) or any(n in t for t, _, _ in planned)]
        if clash:
            raise EmbeddingError(f"--textual_inversion_embeddings {path}: token {clash[0]!r} already exists in the "
                                 "tokenizer (or another embedding); rename the file to a word the tokenizer does not know")
        planned.append((names, vectors, path))
    for names, vectors, path in planned:
        added = tokenizer.add_tokens(names)
        if added != len(names):
            raise EmbeddingError(f"--textual_inversion_embeddings {path}: the tokenizer refused some of {names}; "
                                 "rename the file")
        text_encoder.resize_token_embeddings(len(tokenizer))
        ids = tokenizer.convert_tokens_to_ids(names)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[ids] = vectors.to(weight.device, weight.dtype)
        result.tokens[names[0]] = names
        logger.info("textual inversion: %s -> %d token(s) %s", path.name, len(names), names[0])
    return result
