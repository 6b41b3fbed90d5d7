"""Tiny captioning and tagging models written on the fly for the captioning tests.

* :func:`write_tiny_blip` / :func:`write_tiny_git`: random 1-layer BLIP / GIT models with a
  10-word BERT vocabulary, saved with ``save_pretrained`` together with their processor. The bias
  of the word head is raised for one word, so the caption is that word repeated up to
  ``max_length`` whatever the random weights and the image: exact assertions are possible.
* :func:`write_tiny_tagger`: a WD14-style ``model.onnx`` (built with the onnx helper API) plus a
  ``selected_tags.csv``. Each tag's probability is ``clip(bias + weights . mean_colour, 0, 1)`` with
  the image's mean colour in BGR order scaled to 0..1, so a plain-coloured image gives exactly the
  probabilities :data:`TAGS` states.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "blue", "square", "circle", "on"]
PAD, CLS, SEP, DEC = 0, 2, 3, 5


def _write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return folder


def _vision(image_size: int) -> dict:
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=image_size, patch_size=8)


def write_tiny_blip(folder: Path, *, word: str = "red", image_size: int = 32, boost: float = 30.0) -> Path:
    """A tiny ``BlipForConditionalGeneration`` + ``BlipProcessor`` folder whose caption is ``word word ...``.

    With a small ``boost`` (say 2) the caption is a random mix of words instead, for sampling tests.
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    tokenizer = BertTokenizer.from_pretrained(str(_write_vocab(folder)), bos_token="[DEC]")
    text = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=16,
                bos_token_id=DEC, eos_token_id=SEP, sep_token_id=SEP, pad_token_id=PAD)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=_vision(image_size),
                                                    projection_dim=16))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[WORDS.index(word)] += boost
    model.save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_tiny_git(folder: Path, *, word: str = "square", image_size: int = 32) -> Path:
    """A tiny ``GitForCausalLM`` + ``GitProcessor`` folder whose caption is ``word word ...``."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    torch.manual_seed(0)
    tokenizer = BertTokenizer.from_pretrained(str(_write_vocab(folder)))
    config = GitConfig(vision_config=_vision(image_size), vocab_size=len(WORDS), hidden_size=16,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       max_position_embeddings=64, bos_token_id=CLS, eos_token_id=SEP, pad_token_id=PAD)
    model = GitForCausalLM(config)
    with torch.no_grad():
        model.output.bias[WORDS.index(word)] += 30.0
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


# (name, category, (weight_B, weight_G, weight_R), bias): probability = clip(bias + w . (B, G, R) / 255, 0, 1)
B, G, R = (1, 0, 0), (0, 1, 0), (0, 0, 1)
NONE = (0, 0, 0)
TAGS = [
    ("general", "9", NONE, 0.5),
    ("sensitive", "9", NONE, 0.2),
    ("explicit", "9", R, 0.0),
    ("red_hair", "0", R, 0.0),
    ("blue_sky", "0", B, 0.0),
    ("long_hair", "0", NONE, 0.40),
    ("^_^", "0", NONE, 0.90),
    ("simple_background", "0", NONE, 0.30),
    ("1girl", "0", NONE, 0.80),
    ("hatsune_miku_(vocaloid)", "4", G, 0.0),
    ("alice", "4", NONE, 0.50),
    ("vocaloid", "3", NONE, 0.70),
    ("some_artist", "1", NONE, 0.45),
    ("highres", "5", NONE, 0.38),
    ("best_quality", "quality", R, 0.0),
    ("normal_quality", "quality", NONE, 0.5),
    ("sdxl", "model", NONE, 0.60),
]


def write_tiny_tagger(folder: Path, *, size: int = 16, fixed_batch: int | None = None, tags=TAGS,
                      csv_rows: int | None = None) -> Path:
    """``folder/model.onnx`` (input ``[batch, size, size, 3]``) and ``folder/selected_tags.csv`` for ``tags``.

    ``csv_rows`` writes only that many CSV rows (a tag list that does not match the model).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[2] for t in tags], dtype=np.float32).T / 255.0  # [3, T]
    bias = np.array([t[3] for t in tags], dtype=np.float32)
    batch = fixed_batch if fixed_batch is not None else "batch"
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "weights"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["shifted"]),
        helper.make_node("Clip", ["shifted", "zero", "one"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, len(tags)])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias"),
                     numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
                     numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime that supports opset 17
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = ["tag_id,name,category,count"]
    rows += [f"{1000 + i},{name},{category},{10 * (i + 1)}" for i, (name, category, _, _) in enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(rows[: None if csv_rows is None else csv_rows + 1]) + "\n",
                                              encoding="utf-8")
    return folder


def solid(path: Path, colour: tuple[int, ...], size: tuple[int, int] = (16, 16), mode: str = "RGB") -> Path:
    """A plain-coloured image file (``mode`` RGBA for transparency)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def broken(path: Path) -> Path:
    """A file with an image extension that no decoder can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    return path
