"""Text-encoder output caching: memory and disk caches, reuse and invalidation, refusals, flag checks, wiring."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import toml
import torch

from library.args import ArgumentError, setup_sdxl_network_parser
from library.data.collate import collate_batch
from library.data.errors import DatasetError
from library.data.te_cache import CAPTION_HASH_KEY, cache_path
from library.dataset_config import build_dataset_group
from library.families.base import Prediction
from tests import data_helpers
from tests.data_helpers import parse, write_folder

SUFFIX = "_te_outputs.npz"
CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


class FakeTextEncoder:
    """Counts calls and captions; outputs are a deterministic function of each caption's text."""

    def __init__(self, nan: bool = False):
        self.calls = 0
        self.captions: list[str] = []
        self.nan = nan

    @staticmethod
    def expected(caption: str) -> dict[str, torch.Tensor]:
        seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        return {"hidden_state1": torch.randn(77, 8, generator=g), "pool2": torch.randn(4, generator=g)}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.captions += captions
        per = [self.expected(c) for c in captions]
        out = {key: torch.stack([p[key] for p in per]) for key in per[0]}
        if self.nan:
            out["pool2"][0] = float("nan")
        return out


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "train" / "1_thing"
    write_folder(folder, [(64, 64)] * 3, CAPTIONS, ext=".txt")
    return folder


def make_group(tmp_path, **flags):
    flags.setdefault("caption_extension", ".txt")
    return data_helpers.make_group(tmp_path, **flags)


def cache(group, encoder, **kwargs):
    kwargs.setdefault("suffix", SUFFIX)
    return group.cache_text_encoder_outputs(encoder, **kwargs)


def all_batches(group) -> list[dict]:
    return [group[i] for i in range(len(group))]


def assert_batch_matches_captions(batch: dict) -> None:
    outputs = batch["text_encoder_outputs"]
    assert outputs is not None and set(outputs) == {"hidden_state1", "pool2"}
    assert outputs["hidden_state1"].shape == (len(batch["captions"]), 77, 8)
    for k, caption in enumerate(batch["captions"]):
        for key, value in FakeTextEncoder.expected(caption).items():
            assert torch.equal(outputs[key][k], value), (caption, key)


# ------------------------------------------------------------------------------------- memory


def test_cache_file_name():
    assert cache_path(Path("/d/foo.png"), SUFFIX).name == "foo_te_outputs.npz"
    assert cache_path(Path("/d/a.b.jpg"), SUFFIX).name == "a.b_te_outputs.npz"


def test_memory_cache_puts_each_captions_outputs_in_its_batch_row(tmp_path, folder):
    encoder = FakeTextEncoder()
    group = make_group(tmp_path, train_batch_size=2, caption_prefix="photo of")
    assert cache(group, encoder, batch_size=2) == 3 and encoder.calls == 2
    assert sorted(encoder.captions) == sorted(f"photo of {c}" for c in CAPTIONS)  # the caption batches train on
    assert not list(folder.glob("*.npz"))
    batches = all_batches(group)
    assert sorted(len(b["captions"]) for b in batches) == [1, 2]
    for batch in batches:
        assert_batch_matches_captions(batch)
        assert "input_ids" not in batch
    # the DataLoader glue passes the dict through
    loader = torch.utils.data.DataLoader(group, batch_size=1, collate_fn=collate_batch)
    for batch in loader:
        assert_batch_matches_captions(batch)


def test_uncached_batches_have_none(tmp_path, folder):
    assert make_group(tmp_path)[0]["text_encoder_outputs"] is None


def test_shared_caption_is_encoded_once(tmp_path):
    write_folder(tmp_path / "train" / "2_sks dog", [(64, 64)] * 4)  # no caption files: the class tokens
    encoder = FakeTextEncoder()
    group = make_group(tmp_path, train_batch_size=4)
    assert cache(group, encoder, batch_size=8) == 1 and encoder.captions == ["sks dog"]
    for batch in all_batches(group):
        assert_batch_matches_captions(batch)


def test_replacements_are_part_of_the_cached_caption(tmp_path, folder):
    group = make_group(tmp_path)
    group.add_replacement("circle", "disc")
    encoder = FakeTextEncoder()
    cache(group, encoder, batch_size=3)
    assert "a red disc" in encoder.captions
    for batch in all_batches(group):
        assert_batch_matches_captions(batch)


def test_caption_changed_after_caching_is_an_error(tmp_path, folder):
    group = make_group(tmp_path, train_batch_size=3)
    cache(group, FakeTextEncoder())
    group.add_replacement("circle", "disc")  # too late: the cached outputs belong to "a red circle"
    with pytest.raises(DatasetError, match=r"img0\.png is 'a red disc' but its text encoder outputs were cached "
                                           r"for 'a red circle'"):
        group[0]


def test_mixed_cached_and_uncached_batch_is_an_error(tmp_path, folder):
    group = make_group(tmp_path, train_batch_size=3)
    cache(group, FakeTextEncoder())
    group.images()[1].text_encoder_outputs = None
    with pytest.raises(DatasetError, match="mixes images with and without cached text encoder outputs"):
        group[0]


def test_nan_outputs_name_the_image(tmp_path, folder):
    with pytest.raises(DatasetError, match=r"NaN outputs \(pool2\) for the caption .* of .*img\d\.png"):
        cache(make_group(tmp_path), FakeTextEncoder(nan=True), batch_size=3, to_disk=True)
    assert not list(folder.glob("*.npz"))


def test_malformed_encode_output_is_reported(tmp_path, folder):
    group = make_group(tmp_path)
    with pytest.raises(ValueError, match=r"output 'h' is \(1, 4\) for 3 captions"):
        cache(group, lambda captions: {"h": torch.zeros(1, 4)}, batch_size=3)
    with pytest.raises(ValueError, match="reserved"):
        cache(group, lambda captions: {CAPTION_HASH_KEY: torch.zeros(len(captions), 1)}, batch_size=3)


# --------------------------------------------------------------------------------------- disk


def test_disk_cache_written_reused_and_read_in_batches(tmp_path, folder):
    encoder = FakeTextEncoder()
    group = make_group(tmp_path, train_batch_size=2)
    assert cache(group, encoder, batch_size=2, to_disk=True) == 3 and encoder.calls == 2
    for i, caption in enumerate(CAPTIONS):
        path = folder / f"img{i}_te_outputs.npz"
        with np.load(path) as npz:
            assert set(npz.files) == {"hidden_state1", "pool2", CAPTION_HASH_KEY}
            assert npz["hidden_state1"].shape == (77, 8) and npz["hidden_state1"].dtype == np.float32
            assert npz["pool2"].shape == (4,)
            assert str(npz[CAPTION_HASH_KEY]) == hashlib.sha256(caption.encode()).hexdigest()
    info = group.images()[0]
    assert info.text_encoder_outputs is None and info.text_encoder_outputs_npz == folder / "img0_te_outputs.npz"

    again = make_group(tmp_path, train_batch_size=2)
    encoder2 = FakeTextEncoder()
    assert cache(again, encoder2, to_disk=True) == 0 and encoder2.calls == 0
    for batch in all_batches(again):
        assert_batch_matches_captions(batch)


def test_edited_caption_reencodes_only_that_image(tmp_path, folder):
    cache(make_group(tmp_path), FakeTextEncoder(), batch_size=3, to_disk=True)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    (folder / "img1.txt").write_text("a purple star", encoding="utf-8")
    encoder = FakeTextEncoder()
    group = make_group(tmp_path, train_batch_size=3)
    assert cache(group, encoder, batch_size=3, to_disk=True) == 1 and encoder.captions == ["a purple star"]
    assert_batch_matches_captions(group[0])
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
    assert after["img0_te_outputs.npz"] == before["img0_te_outputs.npz"]
    assert after["img1_te_outputs.npz"] != before["img1_te_outputs.npz"]


def test_torn_file_is_reencoded(tmp_path, folder, caplog):
    cache(make_group(tmp_path), FakeTextEncoder(), batch_size=3, to_disk=True)
    torn = folder / "img2_te_outputs.npz"
    torn.write_bytes(torn.read_bytes()[:40])
    encoder = FakeTextEncoder()
    group = make_group(tmp_path, train_batch_size=3)
    with caplog.at_level(logging.WARNING):
        assert cache(group, encoder, to_disk=True) == 1
    assert encoder.captions == [CAPTIONS[2]] and "unreadable" in caplog.text
    assert_batch_matches_captions(group[0])


def test_skip_cache_check_trusts_existing_files(tmp_path, folder):
    cache(make_group(tmp_path), FakeTextEncoder(), batch_size=3, to_disk=True)
    (folder / "img1.txt").write_text("a purple star", encoding="utf-8")
    (folder / "img2_te_outputs.npz").write_bytes(b"not an npz")
    encoder = FakeTextEncoder()
    assert cache(make_group(tmp_path), encoder, to_disk=True, skip_cache_check=True) == 0 and encoder.calls == 0


def test_kohya_file_without_caption_hash_is_used_as_is(tmp_path, folder):
    kohya = {"hidden_state1": np.ones((77, 8), np.float32), "pool2": np.ones(4, np.float32)}
    np.savez(folder / "img0_te_outputs.npz", **kohya)
    encoder = FakeTextEncoder()
    group = make_group(tmp_path, train_batch_size=3)
    shapes = {"hidden_state1": (77, 8), "pool2": (4,)}
    assert cache(group, encoder, batch_size=3, to_disk=True, expected_shapes=shapes) == 2
    assert CAPTIONS[0] not in encoder.captions
    batch = group[0]
    row = batch["image_keys"].index(str(folder / "img0.png"))
    assert batch["text_encoder_outputs"]["pool2"][row].eq(1).all()


def test_expected_shapes_make_other_files_stale(tmp_path, folder):
    cache(make_group(tmp_path), FakeTextEncoder(), batch_size=3, to_disk=True)
    encoder = FakeTextEncoder()
    longer = {"hidden_state1": (231, 8), "pool2": (4,)}  # e.g. another --max_token_length
    assert cache(make_group(tmp_path), encoder, to_disk=True, expected_shapes=longer) == 3
    encoder = FakeTextEncoder()
    extra_key = {"hidden_state1": (77, 8), "pool2": (4,), "hidden_state2": (77, 16)}
    assert cache(make_group(tmp_path), encoder, to_disk=True, expected_shapes=extra_key) == 3
    encoder = FakeTextEncoder()
    same = {"hidden_state1": (77, 8), "pool2": (4,)}
    assert cache(make_group(tmp_path), encoder, to_disk=True, expected_shapes=same) == 0


def test_stale_shapes_in_one_batch_are_reported(tmp_path, folder):
    cache(make_group(tmp_path), FakeTextEncoder(), batch_size=3, to_disk=True)
    np.savez(folder / "img1_te_outputs.npz", hidden_state1=np.zeros((231, 8), np.float32),
             pool2=np.zeros(4, np.float32))
    group = make_group(tmp_path, train_batch_size=3)
    cache(group, FakeTextEncoder(), to_disk=True, skip_cache_check=True)
    with pytest.raises(DatasetError, match="do not match those of .* stale cache files"):
        group[0]


def test_processes_cache_their_share_then_pick_up_all_files(tmp_path, folder):
    encoders = [FakeTextEncoder(), FakeTextEncoder()]
    for rank, encoder in enumerate(encoders):  # two processes, one after the other
        group = make_group(tmp_path)
        cache(group, encoder, to_disk=True, process_index=rank, num_processes=2)
    assert sorted(encoders[0].captions + encoders[1].captions) == sorted(CAPTIONS)
    assert encoders[0].captions and encoders[1].captions
    final = FakeTextEncoder()
    group = make_group(tmp_path, train_batch_size=3)
    assert cache(group, final, to_disk=True) == 0 and final.calls == 0
    assert_batch_matches_captions(group[0])


def test_same_image_with_two_captions_keeps_the_second_in_memory(tmp_path, folder):
    config = tmp_path / "dataset.toml"
    config.write_text(toml.dumps({"general": {"caption_extension": ".txt", "resolution": 64},
                                  "datasets": [{"subsets": [{"image_dir": str(folder)}]},
                                               {"subsets": [{"image_dir": str(folder), "caption_prefix": "x"}]}]}))
    group = build_dataset_group(parse(dataset_config=config, seed=1))[0]
    encoder = FakeTextEncoder()
    assert cache(group, encoder, batch_size=8, to_disk=True) == 6
    on_disk = [i for i in group.images() if i.text_encoder_outputs_npz is not None]
    in_memory = [i for i in group.images() if i.text_encoder_outputs is not None]
    assert len(on_disk) == 3 and len(in_memory) == 3
    assert all(i.text_encoder_caption.startswith("x ") for i in in_memory)
    for batch in all_batches(group):
        assert_batch_matches_captions(batch)


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("flag, value", [("shuffle_caption", True), ("caption_tag_dropout_rate", 0.1),
                                         ("token_warmup_step", 10), ("caption_dropout_rate", 0.1),
                                         ("caption_dropout_every_n_epochs", 2), ("enable_wildcard", True)])
def test_varying_captions_are_refused_naming_the_option(tmp_path, folder, flag, value):
    group = make_group(tmp_path, **{flag: value})
    with pytest.raises(DatasetError, match=f"text encoder outputs cannot be cached: .*1_thing: {flag} is"):
        group.verify_text_encoder_outputs_cacheable()
    encoder = FakeTextEncoder()
    with pytest.raises(DatasetError, match=flag):
        cache(group, encoder)
    assert encoder.calls == 0


def test_toml_subset_is_named(tmp_path, folder):
    config = tmp_path / "dataset.toml"
    config.write_text(textwrap.dedent(f"""
        [general]
        caption_extension = ".txt"
        resolution = 64
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "{folder.as_posix()}"
          [[datasets.subsets]]
          image_dir = "{(tmp_path / 'other').as_posix()}"
          caption_tag_dropout_rate = 0.2
        """))
    write_folder(tmp_path / "other", [(64, 64)], ["x"], ext=".txt")
    group = build_dataset_group(parse(dataset_config=config, seed=1))[0]
    with pytest.raises(DatasetError, match=r"dataset\.toml: datasets\[0\]\.subsets\[1\]: caption_tag_dropout_rate "
                                           r"is 0\.2 .*drop --cache_text_encoder_outputs"):
        group.verify_text_encoder_outputs_cacheable()


def test_keep_tokens_separator_and_secondary_separator_are_cacheable(tmp_path):
    folder = tmp_path / "train" / "1_x"
    write_folder(folder, [(64, 64)] * 2, ["a ||| b, c ||| d", "e;f, g"], ext=".txt")
    group = make_group(tmp_path, keep_tokens_separator="|||", secondary_separator=";", train_batch_size=2)
    encoder = FakeTextEncoder()
    cache(group, encoder)
    for epoch in (1, 2, 3):
        group.set_current_epoch(epoch)
        assert_batch_matches_captions(group[0])
    assert sorted(encoder.captions) == ["a, b, c, d", "e,f, g"]


# --------------------------------------------------------------------------------- flag checks


def sdxl_args(tmp_path, *extra: str):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    (tmp_path / "train").mkdir(exist_ok=True)
    return setup_sdxl_network_parser().parse_args(
        ["--pretrained_model_name_or_path", str(model), "--output_dir", str(tmp_path / "out"),
         "--train_data_dir", str(tmp_path / "train"), *extra])


def test_flag_checks(tmp_path):
    from library.training.validation import validate_training_args

    args = sdxl_args(tmp_path, "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only")
    validate_training_args(args)
    assert args.cache_text_encoder_outputs  # implied by _to_disk

    with pytest.raises(ArgumentError, match="--cache_text_encoder_outputs needs --network_train_unet_only"):
        validate_training_args(sdxl_args(tmp_path, "--cache_text_encoder_outputs"))
    with pytest.raises(ArgumentError, match="needs --network_train_unet_only"):
        validate_training_args(sdxl_args(tmp_path, "--cache_text_encoder_outputs_to_disk"))
    for flag, value in [("shuffle_caption", None), ("caption_tag_dropout_rate", "0.1"), ("token_warmup_step", "5"),
                        ("caption_dropout_rate", "0.1"), ("caption_dropout_every_n_epochs", "3"),
                        ("enable_wildcard", None)]:
        extra = [f"--{flag}"] + ([value] if value else [])
        with pytest.raises(ArgumentError, match=f"cannot be used with --{flag} "):
            validate_training_args(sdxl_args(tmp_path, "--cache_text_encoder_outputs", "--network_train_unet_only",
                                             *extra))
        validate_training_args(sdxl_args(tmp_path, *extra))  # fine without caching
    with pytest.raises(ArgumentError, match="--text_encoder_batch_size 0 must be 1 or more"):
        validate_training_args(sdxl_args(tmp_path, "--cache_text_encoder_outputs", "--network_train_unet_only",
                                         "--text_encoder_batch_size", "0"))
    validate_training_args(parse("--pretrained_model_name_or_path", str(tmp_path / "model.safetensors"),
                                 "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(tmp_path / "train"),
                                 "--shuffle_caption"))  # the SD1 parser has no caching flags at all


def test_family_without_cache_suffix_is_refused_before_loading(tmp_path):
    from library.families.sd.family import StableDiffusionFamily
    from library.training.trainer import NetworkTrainer

    class NoLoading(StableDiffusionFamily):
        def load_models(self, *a, **k):
            raise AssertionError("models must not be loaded")

    args = sdxl_args(tmp_path, "--cache_text_encoder_outputs", "--network_train_unet_only")
    with pytest.raises(ArgumentError, match=r"this model family \(NoLoading\) cannot cache text encoder outputs"):
        NetworkTrainer(NoLoading()).train(args)


# ------------------------------------------------------------------------------ loss wiring


def test_validation_loss_uses_cached_outputs():
    from library.training.validation_loss import family_batch_losses

    seen = []

    class Family:
        def encode_text(self, *a, **k):
            raise AssertionError("encode_text must not run with cached outputs")

        def conditioning_from_cache(self, models, cached, args, device, dtype):
            seen.append((sorted(cached), device, dtype))
            return cached["pool2"].to(device, dtype)

        def predict(self, models, latents, conditioning, batch, args, *, timesteps, noise):
            return Prediction(pred=latents + conditioning.mean(), target=latents, timesteps=timesteps)

    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    losses = family_batch_losses(Family(), None, SimpleNamespace(mixed_precision="bf16", save_precision=None),
                                 accelerator)
    batch = {"latents": torch.zeros(2, 4, 8, 8), "loss_weights": torch.ones(2),
             "text_encoder_outputs": {"pool2": torch.full((2, 4), 0.5), "hidden_state1": torch.zeros(2, 77, 8)}}
    values = losses(batch, (200, 600), lambda shape: torch.zeros(shape))
    assert values == [0.25, 0.25]
    assert seen == [(["hidden_state1", "pool2"], torch.device("cpu"), torch.bfloat16)]


_CACHING_TRAINING_SCRIPT = '''
import sys
from library.args import setup_sdxl_network_parser
from library.families.sd.family import StableDiffusionFamily
from library.training.trainer import NetworkTrainer

calls = {"encode_text": 0, "from_cache": 0}


class CachingSD(StableDiffusionFamily):
    """SD1 with text-encoder output caching, to run the trainer's caching path on a tiny model."""

    text_encoder_cache_suffix = "_te_outputs.npz"

    def encode_text(self, models, batch, args):
        calls["encode_text"] += 1
        return super().encode_text(models, batch, args)

    def text_encoder_outputs_to_cache(self, conditioning):
        return {"hidden_state": conditioning}

    def conditioning_from_cache(self, models, cached, args, device, dtype):
        calls["from_cache"] += 1
        assert next(models.text_encoders[0].parameters()).device.type == "cpu"
        return cached["hidden_state"].to(device, dtype)


NetworkTrainer(CachingSD()).train(setup_sdxl_network_parser().parse_args(sys.argv[1:]))
print("CALLS", calls["encode_text"], calls["from_cache"])
'''


@pytest.mark.slow
def test_trainer_caches_then_trains_from_the_cache(tmp_path, tiny_sd1_ckpt):
    from library.demo.shapes import write_shapes_folder
    from tests.train_helpers import base_train_args, run_script

    images = tmp_path / "train" / "2_toy"
    write_shapes_folder(images, 4, seed=4)
    script = tmp_path / "train_caching.py"
    script.write_text(_CACHING_TRAINING_SCRIPT)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2\n")
    common = dict(train_data_dir=tmp_path / "train", caption_extension=".txt", max_train_steps=4,
                  cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True, validation_split=0.25,
                  sample_prompts=prompts, sample_every_n_steps=2, text_encoder_batch_size=3)
    proc = run_script(str(script), base_train_args(tiny_sd1_ckpt, tmp_path / "out", **common))
    log = proc.stdout + proc.stderr
    # 3 training + 1 validation image: a probe, one batch of 3 and one of 1; then no encoder in the loop
    assert "CALLS 3 " in proc.stdout, log[-3000:]
    assert int(proc.stdout.split("CALLS 3 ")[1].split()[0]) >= 4  # every training/validation batch
    assert len(list(images.glob("*_te_outputs.npz"))) == 4
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    assert list((tmp_path / "out" / "sample").glob("*.png"))

    again = run_script(str(script), base_train_args(tiny_sd1_ckpt, tmp_path / "out2", **common))
    assert "CALLS 1 " in again.stdout  # the probe only: every file is reused
    assert "0 caption(s) encoded now" in again.stdout + again.stderr
