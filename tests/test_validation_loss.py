"""Validation loss (fixed timesteps and noise, RNG left alone) and the tracker/logging flags."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.args import ArgumentError, setup_network_parser
from library.training import trackers
from library.training.validation import validate_training_args
from library.training.validation_loss import (ValidationRunner, ValidationSettings, preserved_rng_state,
                                              validation_timesteps)


# ----------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("low,high", [(None, None), (0, 1000), (100, 900), (0, 999), (500, 500), (10, 20)])
def test_fixed_timesteps_are_the_interior_points_of_an_even_split(low, high):
    lo = 0 if low is None else low
    hi = 1000 if high is None else high
    expected = [round(lo + (hi - lo) * k / 5) for k in (1, 2, 3, 4)]
    assert validation_timesteps(low, high) == expected


def test_default_timesteps_and_bad_range():
    assert validation_timesteps() == [200, 400, 600, 800]
    with pytest.raises(ValueError, match="below --min_timestep"):
        validation_timesteps(800, 200)


# ----------------------------------------------------------------------------- RNG
def _draw_all() -> tuple:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_rng_state_is_restored():
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = _draw_all()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    with preserved_rng_state():
        _draw_all()
        torch.manual_seed(123)
        random.seed(123)
    assert _draw_all() == expected


def _fake_runner(seed: int = 3, max_steps: int | None = None, calls: list | None = None) -> ValidationRunner:
    settings = ValidationSettings(seed=seed, timesteps=(200, 400, 600, 800), max_steps=max_steps)
    batches = [{"x": torch.full((2, 4), float(i))} for i in range(3)]

    def batch_losses(batch, timesteps, noise_fn):
        if calls is not None:
            calls.append(tuple(timesteps))
        torch.rand(1)  # the family may draw from the global RNG: it must be restored afterwards
        return [float(((batch["x"] - noise_fn(batch["x"].shape)) ** 2).mean()) + t / 1000 for t in timesteps]

    return ValidationRunner(settings=settings, batches=lambda: iter(batches), batch_losses=batch_losses)


def test_validation_pass_is_reproducible_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = _fake_runner().compute()
    assert torch.equal(torch.get_rng_state(), before)
    assert _fake_runner().compute() == first  # same seed, same noise
    assert _fake_runner(seed=4).compute() != first
    calls: list = []
    _fake_runner(max_steps=2, calls=calls).compute()
    assert calls == [(200, 400, 600, 800)] * 2  # --max_validation_steps batches, 4 timesteps each


def test_run_logs_average_and_divergence():
    logged = []
    runner = _fake_runner()
    value = runner.run(kind="step", step=6, train_loss=0.5, log=lambda values, step: logged.append((values, step)))
    assert logged == [({"loss/validation/step_average": value,
                        "loss/validation/step_divergence": pytest.approx(value - 0.5)}, 6)]


def test_schedule_every_epoch_by_default():
    s = ValidationSettings(seed=0, timesteps=(200,))
    assert [s.due_at_epoch_end(e) for e in (1, 2, 3)] == [True, True, True]
    assert not any(s.due_at_step(n) for n in range(1, 10))
    s = ValidationSettings(seed=0, timesteps=(200,), every_n_steps=2, every_n_epochs=3)
    assert [n for n in range(1, 9) if s.due_at_step(n)] == [2, 4, 6, 8]
    assert [e for e in range(1, 7) if s.due_at_epoch_end(e)] == [3, 6]


def test_settings_from_flags():
    args = setup_network_parser().parse_args(["--seed", "5", "--validate_every_n_steps", "10"])
    assert (args.validation_split, args.validation_seed, args.max_validation_steps) == (0.0, None, None)
    s = ValidationSettings.from_args(args)
    assert (s.seed, s.timesteps, s.every_n_steps, s.every_n_epochs) == (5, (200, 400, 600, 800), 10, None)
    args.validation_seed = 9
    assert ValidationSettings.from_args(args).seed == 9


@pytest.mark.parametrize("flags,match", [
    (["--validation_split", "1.0"], "--validation_split"),
    (["--validate_every_n_steps", "0"], "--validate_every_n_steps"),
    (["--max_validation_steps", "0"], "--max_validation_steps"),
    (["--log_tracker_config", "missing.toml"], "--log_tracker_config"),
])
def test_bad_validation_and_logging_flags(tmp_path, tiny_flag_args, flags, match):
    args = tiny_flag_args(flags)
    with pytest.raises(ArgumentError, match=match):
        validate_training_args(args)


@pytest.fixture
def tiny_flag_args(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")

    def make(flags: list[str]) -> argparse.Namespace:
        return setup_network_parser().parse_args(["--pretrained_model_name_or_path", str(model), "--output_dir",
                                                  str(tmp_path), "--train_data_dir", str(tmp_path), *flags])
    return make


def test_the_dataset_layer_reads_the_cli_split():
    from library.dataset_config import cli_values

    args = setup_network_parser().parse_args(["--validation_split", "0.2", "--validation_seed", "11"])
    values = cli_values(args)
    assert values["validation_split"] == 0.2 and values["validation_seed"] == 11


def test_metadata_records_the_validation_flags():
    from library.training.metadata import training_metadata

    args = setup_network_parser().parse_args(["--validation_split", "0.25", "--validation_seed", "3",
                                              "--validate_every_n_steps", "2", "--max_validation_steps", "5"])
    md = training_metadata(args, started_at=0.0, num_train_images=6, num_reg_images=0, num_batches_per_epoch=3,
                           num_epochs=2, optimizer_name="AdamW", network_args={}, dataset_metadata={},
                           family_metadata={}, num_validation_images=1)
    assert {k: md[k] for k in md if "valid" in k} == {
        "ss_num_validation_images": "1", "ss_validation_seed": "3", "ss_validation_split": "0.25",
        "ss_max_validation_steps": "5", "ss_validate_every_n_epochs": "None", "ss_validate_every_n_steps": "2"}


# ----------------------------------------------------------------------------- trackers
def test_tracker_config_has_no_secrets_no_absolute_paths_and_is_hparams_safe(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    args = setup_network_parser().parse_args([
        "--output_dir", str(tmp_path / "out"), "--wandb_api_key", "SECRET", "--log_with", "wandb",
        "--pretrained_model_name_or_path", "~/models/base.safetensors", "--network_args", "conv_dim=4",
        "--text_encoder_lr", "1e-4", "5e-5", "--train_data_dir", "relative/dir"])
    args.huggingface_token = "hf_SECRET"
    args.base_weights = [str(tmp_path / "a.safetensors"), "b.safetensors"]
    args.some_path = tmp_path / "p.toml"
    config = trackers.sanitized_config(args)
    assert "wandb_api_key" not in config and "huggingface_token" not in config
    assert "SECRET" not in repr(config)
    assert config["output_dir"] == "out"
    assert config["pretrained_model_name_or_path"] == "base.safetensors"
    assert config["train_data_dir"] == "relative/dir"  # relative paths reveal nothing
    assert config["base_weights"] == str(["a.safetensors", "b.safetensors"])
    assert config["some_path"] == "p.toml"
    assert config["text_encoder_lr"] == str([1e-4, 5e-5])
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in config.values())
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        writer.add_hparams(config, metric_dict={})  # what accelerate's TensorBoard tracker does with it
    from library.training.trainer import NetworkTrainer

    assert NetworkTrainer.tracker_config(args) == config


def test_tracker_init_kwargs_from_toml_and_run_name(tmp_path):
    cfg = tmp_path / "trackers.toml"
    cfg.write_text('[wandb]\nentity = "me"\ntags = ["lora", "test"]\nname = "from-file"\n'
                   '[tensorboard]\nflush_secs = 5\n')
    args = setup_network_parser().parse_args(["--log_tracker_config", str(cfg), "--wandb_run_name", "run-1"])
    assert trackers.tracker_init_kwargs(args) == {
        "wandb": {"entity": "me", "tags": ["lora", "test"], "name": "run-1"},  # the flag wins
        "tensorboard": {"flush_secs": 5}}
    args = setup_network_parser().parse_args(["--wandb_run_name", "run-2"])
    assert trackers.tracker_init_kwargs(args) == {"wandb": {"name": "run-2"}}
    assert trackers.tracker_init_kwargs(setup_network_parser().parse_args([])) == {}
    bad = tmp_path / "bad.toml"
    bad.write_text('entity = "me"\n')
    with pytest.raises(ArgumentError, match="must be a table"):
        trackers.tracker_init_kwargs(setup_network_parser().parse_args(["--log_tracker_config", str(bad)]))
    broken = tmp_path / "broken.toml"
    broken.write_text('[wandb\n')
    with pytest.raises(ArgumentError, match="not valid TOML"):
        trackers.tracker_init_kwargs(setup_network_parser().parse_args(["--log_tracker_config", str(broken)]))
    crashing = tmp_path / "crashing.toml"  # crashed the toml package with IndexError
    crashing.write_text('a = [ "x", false,]\n')
    with pytest.raises(ArgumentError, match="not valid TOML"):
        trackers.tracker_init_kwargs(setup_network_parser().parse_args(["--log_tracker_config", str(crashing)]))
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[wandb]\nentity = "caf\xe9"\n')
    with pytest.raises(ArgumentError, match="not UTF-8"):
        trackers.tracker_init_kwargs(setup_network_parser().parse_args(["--log_tracker_config", str(latin1)]))


def test_trackers_in_use_and_wandb_login_without_wandb():
    parse = setup_network_parser().parse_args
    assert not trackers.uses_trackers(parse([]))
    assert trackers.uses_trackers(parse(["--logging_dir", "logs"]))
    assert trackers.uses_trackers(parse(["--log_with", "wandb"]))
    trackers.login_wandb(parse(["--wandb_api_key", "k"]))  # wandb not used: nothing happens


# ----------------------------------------------------------------------------- end to end
def _scalars(logging_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(logging_dir.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def validation_runs(tmp_path_factory, tiny_sd1_ckpt):
    """Two identical runs with validation every 2 steps, one whose validation never runs."""
    from library.demo.shapes import write_shapes_folder
    from tests.train_helpers import base_train_args, run_script

    root = tmp_path_factory.mktemp("validation")
    write_shapes_folder(root / "train" / "2_sks", 4, seed=1, trigger="sks")
    common = dict(train_data_dir=root / "train", caption_extension=".txt", max_train_steps=4,
                  validation_split=0.25)
    runs = {}
    for name, extra in [("a", dict(validate_every_n_steps=2)), ("b", dict(validate_every_n_steps=2)),
                        ("quiet", dict(validate_every_n_epochs=1000))]:
        out, logs = root / name, root / f"{name}_logs"
        run_script("train_network.py", base_train_args(tiny_sd1_ckpt, out, logging_dir=logs, **common, **extra))
        runs[name] = (out / "lora.safetensors", logs)
    return runs


@pytest.mark.slow
def test_validation_loss_is_logged_and_reproducible(validation_runs):
    a, b = _scalars(validation_runs["a"][1]), _scalars(validation_runs["b"][1])
    steps = a["loss/validation/step_average"]
    assert [s for s, _ in steps] == [2, 4]
    assert all(v > 0 for _, v in steps)
    assert [s for s, _ in a["loss/validation/step_divergence"]] == [2, 4]
    # 3 training images x 2 repeats / batch 2 = 3 steps an epoch: epochs 1 and 2 end at steps 3 and 4.
    assert [s for s, _ in a["loss/validation/epoch_average"]] == [1, 2]
    assert [s for s, _ in a["loss/validation/epoch_divergence"]] == [1, 2]
    for tag in ("loss/validation/step_average", "loss/validation/epoch_average"):
        assert a[tag] == b[tag]
    quiet = _scalars(validation_runs["quiet"][1])
    assert not any(tag.startswith("loss/validation/") for tag in quiet)


@pytest.mark.slow
def test_validation_does_not_perturb_training(validation_runs):
    with_validation = load_file(str(validation_runs["a"][0]))
    without = load_file(str(validation_runs["quiet"][0]))
    assert with_validation.keys() == without.keys()
    for key in with_validation:
        assert torch.equal(with_validation[key], without[key]), key


@pytest.mark.slow
def test_validation_metadata(validation_runs):
    with safe_open(str(validation_runs["a"][0]), "pt") as f:
        md = f.metadata()
    assert md["ss_num_validation_images"] == "1"  # 4 images, split 0.25
    assert md["ss_num_train_images"] == "6"  # the 3 others x 2 repeats
    assert (md["ss_validation_split"], md["ss_validate_every_n_steps"]) == ("0.25", "2")
    assert md["ss_validation_seed"] == "None" and md["ss_max_validation_steps"] == "None"
