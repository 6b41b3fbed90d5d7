"""Textual inversion embeddings for ``gen_img.py`` (``--textual_inversion_embeddings``).

A file holds ``n`` vectors of the text encoder's width: ``emb_params`` [n, D] (kohya's
``.safetensors``/``.pt``) or A1111's ``{"string_to_param": {"*": [n, D]}}`` (``.pt``). The token
word is the file name without its suffix (``my_style.pt`` -> ``my_style``). Its ``n`` tokens
``name``, ``name1`` ... ``name{n-1}`` are added to the tokenizer, the text encoder's token table
grows to match and the vectors are written into the new rows. In prompts, the word ``name`` expands
to all ``n`` tokens (:meth:`Embeddings.expand`) before encoding, so weights like ``(name:1.2)`` apply
to every vector.

SDXL (two text encoders): a file holds one table per encoder under the names ``keys`` gives,
``clip_l`` [n, 768] and ``clip_g`` [n, 1280] (kohya's ``sdxl_train_textual_inversion.py``); the
same ``n`` tokens are added to both tokenizers and each table goes into its encoder.

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


def _read_file(path: Path):
    if not path.is_file():
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: file not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: cannot read it ({e})") from None


def _as_vectors(vectors, path: Path, what: str) -> torch.Tensor:
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: expected {what} vectors [n, dim], got shape "
                             f"{tuple(vectors.shape)}")
    return vectors.detach().float()


def _file_keys(data) -> str:
    return ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__


def read_embedding(path: str | Path) -> torch.Tensor:
    """The vectors [n, D] of an SD 1.x/2.x embedding file (float32)."""
    path = Path(path)
    data = _read_file(path)
    vectors = None
    if isinstance(data, dict) and "emb_params" in data:
        vectors = data["emb_params"]
    elif isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        params = data["string_to_param"]
        vectors = params.get("*", next(iter(params.values()), None))
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: no embedding found (expected 'emb_params' or "
                             f"A1111 'string_to_param'; the file has: {_file_keys(data)}). SDXL embeddings "
                             "(clip_l/clip_g) need --sdxl and an SDXL model")
    return _as_vectors(vectors, path, "embedding")


def read_embedding_tables(path: str | Path, keys: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """One [n, D_i] table per text encoder: ``keys`` names them in the file (SDXL ``clip_l``,
    ``clip_g``); ``None`` reads the SD format (:func:`read_embedding`)."""
    if keys is None:
        return [read_embedding(path)]
    path = Path(path)
    data = _read_file(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), torch.Tensor) for k in keys):
        hint = (" (an SD 1.x/2.x embedding: use it with an SD model, without --sdxl)"
                if isinstance(data, dict) and ("emb_params" in data or "string_to_param" in data) else "")
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: expected the SDXL keys {', '.join(keys)}; the "
                             f"file has: {_file_keys(data)}{hint}")
    tables = [_as_vectors(data[k], path, repr(k)) for k in keys]
    if len({t.shape[0] for t in tables}) != 1:
        counts = ", ".join(f"{k} {t.shape[0]}" for k, t in zip(keys, tables))
        raise EmbeddingError(f"--textual_inversion_embeddings {path}: the tables have different token counts "
                             f"({counts}); each token needs a vector for every text encoder")
    return tables


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


def load_embeddings(paths: list[str], tokenizer, text_encoder, *, keys: tuple[str, ...] | None = None) -> Embeddings:
    """Add every embedding file's tokens to the tokenizer(s) and its vectors to the text encoder(s).

    ``tokenizer``/``text_encoder``: one each (SD 1.x/2.x), or parallel lists with ``keys`` naming
    each encoder's table in the files (SDXL: ``("clip_l", "clip_g")``).
    """
    result = Embeddings()
    if not paths:
        return result
    tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    if len(tokenizers) != len(encoders) or len(keys or (None,)) != len(encoders):
        raise ValueError(f"load_embeddings: {len(tokenizers)} tokenizer(s), {len(encoders)} text encoder(s) and keys "
                         f"{keys} do not match")
    widths = [te.get_input_embeddings().weight.shape[1] for te in encoders]
    planned: list[tuple[list[str], list[torch.Tensor], Path]] = []
    for p in paths:
        path = Path(p)
        tables = read_embedding_tables(path, keys)
        for i, (vectors, width) in enumerate(zip(tables, widths)):
            if vectors.shape[1] != width:
                what, known = ((f"'{keys[i]}' vectors", f"text encoder {i + 1}") if keys
                               else ("vectors", "the text encoder"))
                raise EmbeddingError(f"--textual_inversion_embeddings {path}: {what} have width {vectors.shape[1]} but "
                                     f"{known} has {width} (an embedding for another model: "
                                     f"{'SDXL clip_l 768, clip_g 1280' if keys else 'SD1 768, SD2 1024'})")
        word = path.stem
        if not word or re.search(r"\s", word):
            raise EmbeddingError(f"--textual_inversion_embeddings {path}: the file name is the token word and must "
                                 "not contain spaces; rename the file")
        names = [word] + [f"{word}{i}" for i in range(1, tables[0].shape[0])]
        clash = [n for n in names
                 if any(_known_token(tok, n) for tok in tokenizers) or any(n in t for t, _, _ in planned)]
        if clash:
            raise EmbeddingError(f"--textual_inversion_embeddings {path}: token {clash[0]!r} already exists in the "
                                 "tokenizer (or another embedding); rename the file to a word the tokenizer does not "
                                 "know")
        planned.append((names, tables, path))
    for names, tables, path in planned:
        for tok, te, vectors in zip(tokenizers, encoders, tables):
            added = tok.add_tokens(names)
            if added != len(names):
                raise EmbeddingError(f"--textual_inversion_embeddings {path}: the tokenizer refused some of {names}; "
                                     "rename the file")
            te.resize_token_embeddings(len(tok))
            ids = tok.convert_tokens_to_ids(names)
            weight = te.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = vectors.to(weight.device, weight.dtype)
        result.tokens[names[0]] = names
        logger.info("textual inversion: %s -> %d token(s) %s", path.name, len(names), names[0])
    return result
