"""Textual inversion: new token vectors are the training target; everything else stays frozen.

:class:`EmbeddingTarget` plugs into the shared loop (:class:`library.training.trainer.Trainer`) the
way a network (:class:`~library.training.targets.NetworkTarget`) or the model itself
(:class:`~library.training.fine_tune.ModelTarget`) does.

What it does, in the loop's order:

* ``validate_args``: ``--token_string`` is one word; ``--output_name`` defaults to it; cached
  text-encoder outputs are refused (the text encoder output is what the vectors change);
  ``--weights`` exists.
* ``prepare_data`` (models loaded, data built, before caching): ``--num_vectors_per_token`` tokens
  ``token``, ``token1``, ... are added to every tokenizer (each must be new); captions are checked
  to contain the token string (the first training image whose caption lacks it is an error: it
  would train nothing), then the token string is expanded to all vector tokens in every caption
  (``sks`` -> ``sks sks1 sks2``, :meth:`~library.data.group.DatasetGroup.add_replacement`); with
  ``--use_object_template`` / ``--use_style_template`` every caption is replaced by a random
  template (:data:`OBJECT_TEMPLATES`, :data:`STYLE_TEMPLATES`) with the tokens in it instead.
* ``create``: the vectors start as ``--weights`` (an embedding file), else the ``--init_word``
  token embeddings repeated over the vectors, else random vectors with the statistics of the
  existing rows (:func:`~library.training.added_tokens.random_vectors`, seeded from ``--seed``).
  Each text encoder's token table is swapped for an
  :class:`~library.training.added_tokens.AddedTokenEmbedding` reading the new ids from the trained
  :class:`~library.training.added_tokens.TokenVectors`, the only module accelerate prepares (and
  saves in ``--save_state``).
* ``save``: ``{"emb_params": [n, D]}`` (SD 1.x/2.x) or ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``
  (:class:`SDXLEmbeddingTarget`) as ``.pt``/``.ckpt`` (``torch.save`` of the dict) or
  ``.safetensors`` with the ``modelspec.*`` metadata (architecture ``.../textual-inversion``,
  Stability's implementation URL), written atomically. ``--save_precision`` sets the dtype, float32
  otherwise.

Previews: the token string in sample prompts is expanded like in captions (:meth:`prompt_text`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from library.args import ArgumentError
from library.data.errors import DatasetError
from library.families.base import FamilyModels, ModelFamily
from library.io_utils import save_safetensors, save_torch
from library.training import added_tokens
from library.training.added_tokens import TokenVectors
from library.training.fine_tune import STABILITY_IMPLEMENTATION
from library.training.targets import TrainingTarget

logger = logging.getLogger(__name__)

EMBEDDING_FORMATS = ("pt", "ckpt", "safetensors")

#: ``--use_object_template``: captions for a thing; ``{}`` becomes the token(s)
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a close-up photo of the {}",
    "a snapshot of a {}",
    "a clear picture of the {}",
    "a bright photo of a {}",
    "a dim photo of the {}",
    "a cropped picture of a {}",
    "a slightly blurry photo of the {}",
    "a sharp photo of a {}",
    "a nice photo of the {}",
    "a photo showing one {}",
    "a photo of my {}",
    "a small {} in a photo",
    "a large {} in a photo",
    "a clean {} photographed up close",
    "a worn {} in a picture",
    "an image of a {}",
    "a rendering of the {}",
    "a studio photo of a {}",
    "the {} seen from the front",
)

#: ``--use_style_template``: captions for a look; ``{}`` becomes the token(s)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "an artwork in the style of {}",
    "a picture in the style of {}",
    "a drawing in the style of {}",
    "an illustration in the style of {}",
    "a sketch in the style of {}",
    "a rendering in the style of {}",
    "a poster in the style of {}",
    "a detailed painting in the style of {}",
    "a small painting in the style of {}",
    "a large artwork in the style of {}",
    "a colourful picture in the style of {}",
    "a dark painting in the style of {}",
    "a bright illustration in the style of {}",
    "an image made in the style of {}",
    "artwork with the look of {}",
)


def template_captions(args, tokens: list[str]) -> list[str] | None:
    """The template list with ``tokens`` in it, or None when no template flag is set."""
    if not (args.use_object_template or args.use_style_template):
        return None
    templates = OBJECT_TEMPLATES if args.use_object_template else STYLE_TEMPLATES
    return [t.format(" ".join(tokens)) for t in templates]


def check_captions_contain(group, token_string: str) -> None:
    """Raise a :class:`DatasetError` naming the first training image (regularization images are
    exempt) whose caption, with its subset's prefix/suffix, does not contain ``token_string``.

    Such an image trains nothing: with everything but the token's vectors frozen, a caption without
    the token gives the vectors no gradient. Custom datasets (``--dataset_class``) are not checked.
    """
    lacking = []
    for ds in getattr(group, "datasets", None) or []:
        for info in getattr(ds, "images", None) or []:
            if info.is_reg:
                continue
            parts = (getattr(info.subset, "caption_prefix", None), info.caption,
                     getattr(info.subset, "caption_suffix", None))
            if not any(token_string in part for part in parts if part):
                lacking.append(info)
    if lacking:
        first = lacking[0]
        more = f" (and {len(lacking) - 1} more image(s))" if len(lacking) > 1 else ""
        raise DatasetError(f"{first.path}: the caption {first.caption!r} does not contain the token string "
                           f"{token_string!r}{more}; only the token's vectors are trained, so such an image teaches "
                           f"nothing: put {token_string!r} into the captions (or caption_prefix = \"{token_string} \" / "
                           "--caption_prefix), or use --use_object_template / --use_style_template")


class EmbeddingTarget(TrainingTarget):
    """New token vectors for every text encoder of the family; the base models stay frozen.

    ``file_keys``: the key of each text encoder's table in the embedding file (SD: one).
    """

    tool_kind = "textual_inversion"
    file_keys: tuple[str, ...] = ("emb_params",)
    train_text_encoder = True  # the text encoders run with gradients: they carry them to the vectors
    trains_base_weights = False

    def __init__(self) -> None:
        self.names: list[str] = []
        self.first_ids: list[int] = []
        self.vectors: TokenVectors | None = None  # unwrapped
        self.prepared: nn.Module | None = None
        self.models: FamilyModels | None = None

    # --- set-up --------------------------------------------------------------------------------
    def validate_args(self, args) -> None:
        added_tokens.check_token_string(args.token_string)
        if args.num_vectors_per_token < 1:
            raise ArgumentError(f"--num_vectors_per_token {args.num_vectors_per_token} must be 1 or more")
        if args.use_object_template and args.use_style_template:
            raise ArgumentError("--use_object_template and --use_style_template exclude each other: pick one")
        if getattr(args, "cache_text_encoder_outputs", False) or getattr(args, "cache_text_encoder_outputs_to_disk",
                                                                         False):
            raise ArgumentError("--cache_text_encoder_outputs cannot be used for textual inversion: the trained "
                                "vectors change the text encoder output every step; drop the flag (caching latents "
                                "is fine)")
        if args.weights and not os.path.isfile(args.weights):
            raise ArgumentError(f"--weights {args.weights}: no such file (an embedding .pt/.safetensors to continue "
                                "from)")
        if args.save_model_as not in EMBEDDING_FORMATS:
            raise ArgumentError(f"--save_model_as {args.save_model_as}: an embedding is saved as "
                                f"{', '.join(EMBEDDING_FORMATS)}")
        args.output_name = args.output_name or args.token_string

    def prepare_data(self, args, family: ModelFamily, models: FamilyModels, groups: list) -> None:
        names = added_tokens.token_names(args.token_string, args.num_vectors_per_token)
        several = len(models.tokenizers) > 1
        self.first_ids = [added_tokens.add_new_tokens(tok, names, which=f"tokenizer {i + 1}" if several
                                                      else "the tokenizer")
                          for i, tok in enumerate(models.tokenizers)]
        self.names = names
        templates = template_captions(args, names)
        if templates is None:
            check_captions_contain(groups[0], args.token_string)
        for group in groups:
            if templates is None and len(names) == 1:
                continue  # the token string already is the only token
            if not hasattr(group, "add_replacement"):
                raise ArgumentError(f"--dataset_class {type(group).__name__} has no add_replacement(old, new), which "
                                    "textual inversion needs for --num_vectors_per_token > 1 and the templates")
            if templates is not None:
                group.add_replacement("", templates)  # "": the whole caption becomes one of them, at random
            else:
                group.add_replacement(args.token_string, " ".join(names))
        logger.info("textual inversion: tokens %s (ids from %s)%s", " ".join(names), self.first_ids,
                    f", {'object' if args.use_object_template else 'style'} templates" if templates else "")

    def create(self, args, family: ModelFamily, models: FamilyModels) -> None:
        if len(models.text_encoders) != len(self.file_keys):
            raise RuntimeError(f"{type(self).__name__} saves {len(self.file_keys)} table(s) but the model has "
                               f"{len(models.text_encoders)} text encoder(s)")
        tables = self.initial_tables(args, models)
        self.vectors = TokenVectors(dict(zip(self.file_keys, tables)))
        for te, first, key in zip(models.text_encoders, self.first_ids, self.file_keys):
            added_tokens.install(te, first, self.vectors, key)
        self.prepared = self.vectors
        self.models = models

    def initial_tables(self, args, models: FamilyModels) -> list[torch.Tensor]:
        """Start values, one ``[n, D_i]`` per text encoder: ``--weights``, ``--init_word`` or random."""
        n = args.num_vectors_per_token
        weights = [te.get_input_embeddings().weight for te in models.text_encoders]
        if args.weights:
            return self.read_weights(args.weights, n, [w.shape[1] for w in weights])
        if args.init_word:
            return [added_tokens.init_word_vectors(tok, w, args.init_word, n)
                    for tok, w in zip(models.tokenizers, weights)]
        generator = torch.Generator().manual_seed(int(args.seed))
        return [added_tokens.random_vectors(w, n, generator) for w in weights]

    def read_weights(self, path: str, num_vectors: int, widths: list[int]) -> list[torch.Tensor]:
        from library.generation.textual_inversion import EmbeddingError, read_embedding_tables

        try:
            tables = read_embedding_tables(path, None if self.file_keys == ("emb_params",) else self.file_keys)
        except EmbeddingError as e:
            raise ArgumentError(str(e).replace("--textual_inversion_embeddings", "--weights", 1)) from None
        for key, table, width in zip(self.file_keys, tables, widths):
            if table.shape[0] != num_vectors:
                raise ArgumentError(f"--weights {path} holds {table.shape[0]} vector(s) per token but "
                                    f"--num_vectors_per_token is {num_vectors}: set --num_vectors_per_token "
                                    f"{table.shape[0]}")
            if table.shape[1] != width:
                raise ArgumentError(f"--weights {path}: {key} vectors have width {table.shape[1]} but the text "
                                    f"encoder has {width} (an embedding for another model)")
        logger.info("--weights: continuing from %s", path)
        return tables

    def prepare_for_training(self, args, family: ModelFamily, models: FamilyModels) -> None:
        self.vectors.requires_grad_(True)

    # --- optimizer and accelerate --------------------------------------------------------------
    def optimizer_params(self, args):
        return [{"params": self.vectors.tables(), "lr": args.learning_rate}], ["textual_inversion"]

    def modules(self) -> list[nn.Module]:
        return [self.prepared]

    def set_prepared(self, prepared: list[nn.Module], accelerator) -> None:
        # The text encoders keep reading the unwrapped module's Parameters: the same tensors.
        self.prepared = prepared[0]
        self.vectors = accelerator.unwrap_model(self.prepared)

    def trainable_parameters(self):
        return self.vectors.tables()

    # --- output --------------------------------------------------------------------------------
    def embedding_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """What the file holds: ``{key: [n, D]}`` on the CPU, in ``dtype`` (default float32)."""
        return {key: table.detach().to("cpu", dtype or torch.float32).contiguous()
                for key, table in zip(self.file_keys, self.vectors.tables())}

    def save(self, path: Path, dtype, metadata, *, epoch: int, step: int) -> None:
        state = self.embedding_state_dict(dtype)
        if Path(path).suffix.lower() == ".safetensors":
            save_safetensors(state, path, embedding_modelspec(metadata) or None)
        else:
            save_torch(state, path)

    def prompt_text(self, text: str) -> str:
        """The token string (whole word) expanded to all vector tokens, as ``gen_img.py`` expands it."""
        if len(self.names) <= 1 or not text:
            return text
        return re.sub(rf"(?<![\w]){re.escape(self.names[0])}(?![\w])", " ".join(self.names), text)


class SDXLEmbeddingTarget(EmbeddingTarget):
    """SDXL: one table per text encoder, ``clip_l`` [n, 768] and ``clip_g`` [n, 1280]."""

    file_keys = ("clip_l", "clip_g")


def embedding_modelspec(metadata: dict[str, str]) -> dict[str, str]:
    """The ``modelspec.*`` keys of an embedding file: the run's, with the architecture suffix
    ``/textual-inversion`` and Stability's implementation URL (as the reference writes for any TI)."""
    spec = {k: v for k, v in metadata.items() if k.startswith("modelspec.")}
    if "modelspec.architecture" in spec:
        arch = spec["modelspec.architecture"].removesuffix("/lora")
        spec["modelspec.architecture"] = f"{arch}/textual-inversion"
        spec["modelspec.implementation"] = STABILITY_IMPLEMENTATION
    if spec.get("modelspec.title", "").startswith("LoRA@"):
        spec["modelspec.title"] = "TextualInversion@" + spec["modelspec.title"][len("LoRA@"):]
    return spec
