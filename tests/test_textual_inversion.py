"""train_textual_inversion.py and sdxl_train_textual_inversion.py: only the new token vectors train,
the files load in gen_img.py and change only prompts with the token; the pieces behind them."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import toml
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.args import ArgumentError, setup_sdxl_textual_inversion_parser, setup_textual_inversion_parser
from library.data.errors import DatasetError
from library.demo.shapes import write_shapes_folder
from library.families.base import FamilyModels
from library.training import added_tokens
from library.training.textual_inversion import (OBJECT_TEMPLATES, STYLE_TEMPLATES, EmbeddingTarget,
                                                SDXLEmbeddingTarget, embedding_modelspec)
from tests.train_helpers import base_train_args, run_script

CPU = torch.device("cpu")
TOKEN = "zxqtoy"
STABILITY = "https://github.com/Stability-AI/generative-models"


def ti_args(model: Path, out: Path, **overrides) -> list[str]:
    values = dict(network_module=None, network_dim=None, network_alpha=None, output_name=None, save_model_as=None,
                  token_string=TOKEN, learning_rate=5e-2, caption_extension=".txt")
    values.update(overrides)
    return base_train_args(model, out, **values)


def parse(*argv: str, sdxl: bool = False) -> argparse.Namespace:
    parser = setup_sdxl_textual_inversion_parser() if sdxl else setup_textual_inversion_parser()
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def sd_models(tiny_sd1_ckpt):
    from library.families.sd.loading import load_sd_models

    return load_sd_models(tiny_sd1_ckpt, v2=False)


def fresh_models(tiny_sd1_ckpt) -> FamilyModels:
    from library.families.sd.loading import load_sd_models

    sd = load_sd_models(tiny_sd1_ckpt, v2=False)
    return FamilyModels(denoiser=sd.unet, vae=sd.vae, text_encoders=[sd.text_encoder], tokenizers=[sd.tokenizer])


def vocab_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


class StubGroup:
    """Stands in for a dataset group where only the replacements matter."""

    def __init__(self) -> None:
        self.replacements: dict = {}

    def add_replacement(self, old, new) -> None:
        self.replacements[old] = new


# ------------------------------------------------------------------------------ pieces


def test_added_token_embedding_is_exact_and_trains_only_the_new_rows():
    torch.manual_seed(0)
    base = torch.nn.Embedding(10, 4)
    base.weight.requires_grad_(False)
    before = base.weight.detach().clone()
    vectors = added_tokens.TokenVectors({"emb_params": torch.randn(2, 4)})
    text_encoder = torch.nn.Module()
    text_encoder.emb = base
    text_encoder.get_input_embeddings = lambda: text_encoder.emb
    text_encoder.set_input_embeddings = lambda m: setattr(text_encoder, "emb", m)
    embedding = added_tokens.install(text_encoder, 10, vectors, "emb_params")
    assert embedding.weight is base.weight and set(embedding.state_dict()) == {"weight"}  # same tensor, same key
    assert list(text_encoder.parameters()) == [base.weight]  # the trained table is not the encoder's
    ids = torch.tensor([[1, 10, 3, 11, 0]])
    out = embedding(ids)
    assert torch.equal(out[0, [0, 2, 4]], before[[1, 3, 0]])
    assert torch.equal(out[0, [1, 3]], vectors.emb_params.detach())
    out.square().sum().backward()
    assert base.weight.grad is None and vectors.emb_params.grad.abs().sum() > 0
    half = added_tokens.AddedTokenEmbedding(torch.nn.Embedding(10, 4).half(), 10, vectors, "emb_params")
    assert half(ids).dtype == torch.float16  # the vectors are cast to the frozen table's dtype


def test_tokens_are_added_once_and_known_words_are_refused(sd_models):
    from library.families.sd.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(v2=False)
    names = added_tokens.token_names(TOKEN, 3)
    assert names == ["zxqtoy", "zxqtoy1", "zxqtoy2"]
    assert added_tokens.add_new_tokens(tok, names) == 49408
    assert vocab_ids(tok, "a zxqtoy zxqtoy1 zxqtoy2") == [320, 49408, 49409, 49410]
    with pytest.raises(ArgumentError, match="'zxqtoy' is already a token"):
        added_tokens.add_new_tokens(tok, names)  # a second time
    with pytest.raises(ArgumentError, match="'cat' is already a token of tokenizer 2"):
        added_tokens.add_new_tokens(build_clip_tokenizer(v2=False), ["cat"], which="tokenizer 2")
    with pytest.raises(ArgumentError, match="one word"):
        added_tokens.check_token_string("two words")
    with pytest.raises(ArgumentError, match="--token_string is required"):
        added_tokens.check_token_string(None)


def test_init_word_weights_and_random_start(tiny_sd1_ckpt, tmp_path):
    args = parse("--token_string", TOKEN, "--num_vectors_per_token", "3", "--init_word", "red circle", "--seed", "4")
    models = fresh_models(tiny_sd1_ckpt)
    table = models.text_encoders[0].get_input_embeddings().weight.detach().clone()
    target = EmbeddingTarget()
    target.prepare_data(args, None, models, [StubGroup()])
    target.create(args, None, models)
    red, circle = vocab_ids(models.tokenizers[0], "red circle")
    assert torch.equal(target.vectors.emb_params.detach(), table[[red, circle, red]])  # repeated over the vectors
    # the text encoder reads the new ids from the trained table, the old ones from its own
    ids = torch.tensor([[49406, 49408, 49409, 49410, red, 49407]])
    got = models.text_encoders[0].get_input_embeddings()(ids)
    assert torch.equal(got[0, 1:5], table[[red, circle, red, red]])

    saved = tmp_path / "start.safetensors"
    save_file({"emb_params": torch.randn(3, 32)}, saved)
    a1111 = tmp_path / "a1111.pt"
    torch.save({"string_to_param": {"*": torch.randn(3, 32)}}, a1111)
    for path, expected in ((saved, load_file(saved)["emb_params"]),
                           (a1111, torch.load(a1111, weights_only=True)["string_to_param"]["*"])):
        target = EmbeddingTarget()
        models = fresh_models(tiny_sd1_ckpt)
        target.prepare_data(args, None, models, [StubGroup()])
        target.create(parse("--token_string", TOKEN, "--num_vectors_per_token", "3", "--weights", str(path)), None,
                      models)
        assert torch.equal(target.vectors.emb_params.detach(), expected)
    with pytest.raises(ArgumentError, match="holds 3 vector.*set --num_vectors_per_token 3"):
        target.read_weights(str(saved), 2, [32])
    with pytest.raises(ArgumentError, match="--weights .*no embedding found"):
        bad = tmp_path / "bad.safetensors"
        save_file({"something": torch.zeros(1, 32)}, bad)
        target.read_weights(str(bad), 1, [32])

    starts = []
    for _ in range(2):  # without --init_word: random, from --seed only, the size of real rows
        target, models = EmbeddingTarget(), fresh_models(tiny_sd1_ckpt)
        target.prepare_data(args, None, models, [StubGroup()])
        state = torch.random.get_rng_state()
        target.create(parse("--token_string", TOKEN, "--num_vectors_per_token", "3", "--seed", "4"), None, models)
        assert torch.equal(state, torch.random.get_rng_state())  # the training's random stream is untouched
        starts.append(target.vectors.emb_params.detach())
    assert torch.equal(*starts)
    assert 0.5 < float(starts[0].std() / table.std()) < 2


def test_flag_checks():
    target = EmbeddingTarget()
    args = parse("--token_string", TOKEN)
    target.validate_args(args)
    assert args.output_name == TOKEN and args.save_model_as == "pt"
    with pytest.raises(ArgumentError, match="exclude each other"):
        target.validate_args(parse("--token_string", TOKEN, "--use_object_template", "--use_style_template"))
    with pytest.raises(ArgumentError, match="--cache_text_encoder_outputs cannot be used for textual inversion"):
        SDXLEmbeddingTarget().validate_args(parse("--token_string", TOKEN, "--cache_text_encoder_outputs", sdxl=True))
    with pytest.raises(ArgumentError, match="--weights nope.pt: no such file"):
        target.validate_args(parse("--token_string", TOKEN, "--weights", "nope.pt"))
    with pytest.raises(SystemExit):
        parse("--token_string", TOKEN, "--caption_dropout_rate", "0.1")  # not a TI flag, as in the reference
    assert embedding_modelspec({"modelspec.architecture": "stable-diffusion-v1/lora", "ss_seed": "1",
                                "modelspec.implementation": "diffusers", "modelspec.title": "LoRA@12"}) == {
        "modelspec.architecture": "stable-diffusion-v1/textual-inversion", "modelspec.implementation": STABILITY,
        "modelspec.title": "TextualInversion@12"}


def _group(args):
    from library.dataset_config import build_dataset_group
    from library.families.sd.tokenizer import build_clip_tokenizer

    group, _ = build_dataset_group(args)
    models = FamilyModels(denoiser=None, vae=None, text_encoders=[], tokenizers=[build_clip_tokenizer(v2=False)])
    return group, models


def _captions(group) -> set[str]:
    group.set_current_epoch(1)
    return {c for i in range(len(group)) for c in group[i]["captions"]}


def test_captions_need_the_token_unless_a_template_replaces_them(tmp_path):
    write_shapes_folder(tmp_path / "train" / "2_thing", 3, seed=1)
    write_shapes_folder(tmp_path / "reg" / "1_thing", 1, seed=2)  # regularization images may lack it
    flags = ["--train_data_dir", str(tmp_path / "train"), "--reg_data_dir", str(tmp_path / "reg"),
             "--caption_extension", ".txt", "--resolution", "64", "--seed", "1", "--token_string", TOKEN,
             "--num_vectors_per_token", "2"]
    group, models = _group(parse(*flags))
    with pytest.raises(DatasetError, match=r"img000\.png: the caption .* does not contain the token string 'zxqtoy' "
                                           r"\(and 2 more image\(s\)\).*--use_object_template"):
        EmbeddingTarget().prepare_data(parse(*flags), None, models, [group])

    for flag, templates in (("--use_object_template", OBJECT_TEMPLATES), ("--use_style_template", STYLE_TEMPLATES)):
        group, models = _group(parse(*flags, flag))
        EmbeddingTarget().prepare_data(parse(*flags, flag), None, models, [group])
        captions = _captions(group)
        expected = {t.format("zxqtoy zxqtoy1") for t in templates}
        assert captions <= expected and len(captions) > 1, captions

    # a caption prefix carrying the token is enough; the token is expanded to all vectors
    group, models = _group(parse(*flags, "--caption_prefix", f"{TOKEN},"))
    target = EmbeddingTarget()
    target.prepare_data(parse(*flags), None, models, [group])
    assert all(c.startswith("zxqtoy zxqtoy1, a ") for c in _captions(group) if "zxqtoy" in c)
    assert target.prompt_text("a zxqtoy, not zxqtoyish") == "a zxqtoy zxqtoy1, not zxqtoyish"


# --------------------------------------------------------------------------- end to end

_SPY = '''
import sys
from safetensors.torch import save_file
from library.training import textual_inversion

seen = {}
create = textual_inversion.EmbeddingTarget.create


def spy(self, args, family, models):
    create(self, args, family, models)
    seen["models"] = models


textual_inversion.EmbeddingTarget.create = spy
import SCRIPT

SCRIPT.main(sys.argv[2:])
models = seen["models"]
state = {"te%d.%s" % (i, k): v for i, te in enumerate(models.text_encoders) for k, v in te.state_dict().items()}
state.update({"unet." + k: v for k, v in models.denoiser.state_dict().items()})
save_file({k: v.detach().contiguous() for k, v in state.items()}, sys.argv[1])
'''


def run_with_state_dump(script: str, tmp: Path, dump: Path, argv: list[str]):
    """Run an entry script's ``main`` in a subprocess and dump its text encoders' and U-Net's state after training."""
    driver = tmp / f"spy_{script}.py"
    driver.write_text(_SPY.replace("SCRIPT", script.removesuffix(".py")))
    return run_script(str(driver), [dump, *argv])


@pytest.fixture(scope="module")
def sd_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ti_data")
    write_shapes_folder(root / "train" / "5_zxqtoy shape", 4, seed=3, trigger=TOKEN)
    (root / "prompts.txt").write_text(f"a {TOKEN} on a red background --w 64 --h 64 --s 2 --d 3\n")
    return root


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, tiny_sd1_ckpt, sd_data):
    out = tmp_path_factory.mktemp("ti_out")
    argv = ti_args(tiny_sd1_ckpt, out, train_data_dir=sd_data / "train", num_vectors_per_token=2, init_word="shape",
                   max_train_steps=6, save_every_n_steps=3, save_state=True, cache_latents=True,
                   sample_prompts=sd_data / "prompts.txt", sample_every_n_steps=3)
    run_with_state_dump("train_textual_inversion.py", out, out / "dump.safetensors", argv)
    return out, argv


@pytest.mark.slow
def test_sd_embedding_file_state_and_untouched_models(sd_run, tiny_sd1_ckpt):
    from library.families.sd.loading import load_sd_models

    out, _ = sd_run
    saved = torch.load(out / f"{TOKEN}.pt", map_location="cpu", weights_only=True)  # output_name = token_string
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (2, 32)
    assert saved["emb_params"].dtype == torch.float32
    assert (out / f"{TOKEN}-step00000003.pt").is_file() and (out / f"{TOKEN}-step00000003-state").is_dir()
    state = load_file(out / f"{TOKEN}-state" / "model.safetensors")  # the vectors are in the accelerate state
    assert list(state) == ["emb_params"] and torch.equal(state["emb_params"], saved["emb_params"])
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) == 2

    original = load_sd_models(tiny_sd1_ckpt, v2=False)
    shape = vocab_ids(original.tokenizer, "shape")[0]
    init = original.text_encoder.get_input_embeddings().weight[[shape, shape]]
    assert (saved["emb_params"] - init).abs().max() > 0.05  # the new rows trained away from the init word
    dump = load_file(out / "dump.safetensors")
    before = {**{"te0." + k: v for k, v in original.text_encoder.state_dict().items()},
              **{"unet." + k: v for k, v in original.unet.state_dict().items()}}
    assert dump.keys() == before.keys()
    changed = [k for k in before if not torch.equal(dump[k], before[k])]
    assert changed == []  # every old row, the rest of the text encoder and the U-Net: bit-identical


@pytest.mark.slow
def test_sd_embedding_in_gen_img_changes_only_prompts_with_the_token(sd_run, tiny_sd1_ckpt, tmp_path):
    from PIL import Image

    from library.generation.cli import setup_parser, validate_args
    from library.generation.runner import load_generator, run

    out, _ = sd_run

    def make_args(outdir, *extra):
        parser = setup_parser()
        args = parser.parse_args(["--ckpt", str(tiny_sd1_ckpt), "--outdir", str(outdir), "--W", "64", "--H", "64",
                                  "--steps", "3", "--console_log_simple", *map(str, extra)])
        validate_args(parser, args)
        return args

    def image(generator, prompt: str, name: str) -> np.ndarray:
        (path,) = run(make_args(tmp_path / name, "--prompt", f"{prompt} --d 7"), generator)
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    base = load_generator(make_args(tmp_path, "--prompt", "x"), CPU)
    ti = load_generator(make_args(tmp_path, "--prompt", "x", "--textual_inversion_embeddings", out / f"{TOKEN}.pt"),
                        CPU)
    # before training, "zxqtoy" read as "shape shape" (--init_word, two vectors): now it is something else
    trained = image(ti, f"a {TOKEN} on a red background", "trained")
    init = image(ti, "a shape shape on a red background", "init")
    assert np.abs(trained - init).mean() > 0.5
    assert np.array_equal(image(ti, "a red circle", "with"), image(base, "a red circle", "without"))


@pytest.mark.slow
def test_resume_continues_bit_identically(sd_run, tiny_sd1_ckpt, tmp_path):
    out, argv = sd_run
    resumed = tmp_path / "resumed"
    argv = [str(a) for a in argv]
    argv[argv.index("--output_dir") + 1] = str(resumed)
    run_script("train_textual_inversion.py", [*argv, "--resume", out / f"{TOKEN}-step00000003-state"])
    a = torch.load(out / f"{TOKEN}.pt", weights_only=True)["emb_params"]
    b = torch.load(resumed / f"{TOKEN}.pt", weights_only=True)["emb_params"]
    assert torch.equal(a, b)


@pytest.mark.slow
def test_sdxl_writes_clip_l_and_clip_g_and_gen_img_loads_them(tmp_path, tiny_sdxl_ckpt):
    from PIL import Image

    from library.families.sdxl.loading import load_sdxl_models
    from library.generation.cli import setup_parser, validate_args
    from library.generation.runner import load_generator, run

    write_shapes_folder(tmp_path / "images", 3, seed=2)  # captions without the token: templates replace them
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(toml.dumps({"general": {"caption_extension": ".txt"}, "datasets": [
        {"resolution": 64, "batch_size": 2, "subsets": [{"image_dir": str(tmp_path / "images"), "num_repeats": 3}]}]}))
    out = tmp_path / "out"
    run_with_state_dump("sdxl_train_textual_inversion.py", tmp_path, tmp_path / "dump.safetensors",
                        ti_args(tiny_sdxl_ckpt, out, dataset_config=dataset, num_vectors_per_token=3,
                                use_style_template=True, save_model_as="safetensors", max_train_steps=4,
                                cache_latents=True, resolution=None, train_batch_size=None))
    path = out / f"{TOKEN}.safetensors"
    saved = load_file(path)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"clip_l": (3, 32), "clip_g": (3, 32)}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert metadata["modelspec.implementation"] == STABILITY and metadata["modelspec.title"] == TOKEN
    assert not any(k.startswith("ss_") for k in metadata)

    original = load_sdxl_models(tiny_sdxl_ckpt)
    dump = load_file(tmp_path / "dump.safetensors")
    before = {**{f"te{i}.{k}": v for i, te in enumerate(original.text_encoders) for k, v in te.state_dict().items()},
              **{"unet." + k: v for k, v in original.unet.state_dict().items()}}
    assert dump.keys() == before.keys()
    assert [k for k in before if not torch.equal(dump[k], before[k])] == []

    def make_args(outdir, *extra):
        parser = setup_parser()
        args = parser.parse_args(["--ckpt", str(tiny_sdxl_ckpt), "--sdxl", "--outdir", str(outdir), "--W", "64",
                                  "--H", "64", "--steps", "2", "--console_log_simple", *map(str, extra)])
        validate_args(parser, args)
        return args

    def image(generator, prompt: str, name: str) -> np.ndarray:
        (p,) = run(make_args(tmp_path / name, "--prompt", f"{prompt} --d 2"), generator)
        return np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)

    ti = load_generator(make_args(tmp_path, "--prompt", "x", "--textual_inversion_embeddings", path), CPU)
    base = load_generator(make_args(tmp_path, "--prompt", "x"), CPU)
    assert np.abs(image(ti, f"a painting in the style of {TOKEN}", "a")
                  - image(ti, "a painting in the style of", "b")).mean() > 0.5
    assert np.array_equal(image(ti, "a red circle", "c"), image(base, "a red circle", "d"))
