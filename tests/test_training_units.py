"""Unit tests of the loop's components: save names and pruning, step parsing, loss log, data order."""

from __future__ import annotations

import argparse

import pytest
import torch

from library.args import ArgumentError, setup_network_parser
from library.config_file import parse_args_with_config
from library.training.data_order import EpochShuffleSampler
from library.training.loss_log import LossLog, NonFiniteLossError
from library.training.optimizer import choose_optimizer, parse_kv_args, resolve_steps
from library.training.saving import SavePolicy, read_train_state, write_train_state


def policy(tmp_path, **kw) -> SavePolicy:
    args = setup_network_parser().parse_args(["--output_dir", str(tmp_path)] + sum(
        ([f"--{k}"] + ([] if v is True else [str(v)]) for k, v in kw.items()), []))
    return SavePolicy.from_args(args, num_train_epochs=10)


def test_file_names_follow_the_reference(tmp_path):
    p = policy(tmp_path, output_name="mylora")
    assert p.model_path(p.final_stem()).name == "mylora.safetensors"
    assert p.model_path(p.epoch_stem(3)).name == "mylora-000003.safetensors"
    assert p.model_path(p.step_stem(100)).name == "mylora-step00000100.safetensors"
    assert p.state_dir(p.epoch_stem(3)).name == "mylora-000003-state"
    assert p.state_dir(p.final_stem()).name == "mylora-state"
    unnamed = policy(tmp_path, save_model_as="pt")
    assert [unnamed.model_path(s).name for s in (unnamed.final_stem(), unnamed.epoch_stem(1), unnamed.step_stem(5))] \
        == ["last.pt", "epoch-000001.pt", "at-step00000005.pt"]


def test_epoch_saves_and_pruning(tmp_path):
    p = policy(tmp_path, output_name="n", save_every_n_epochs=2, save_last_n_epochs=2)
    assert [e for e in range(1, 11) if p.saves_at_epoch_end(e, 10)] == [2, 4, 6, 8]  # 10 is the final save
    for e in (2, 4, 6):
        p.model_path(p.epoch_stem(e)).write_bytes(b"x")
        p.prune_after_epoch_save(e)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["n-000004.safetensors", "n-000006.safetensors"]


def test_step_pruning_rule(tmp_path):
    p = policy(tmp_path, save_every_n_steps=10, save_last_n_steps=25)
    # keep saves from the last 25 steps: at step 50 the save of step 20 goes (50-25-1=24 -> 20)
    assert p.stale_step(50, 25) == 20
    assert p.stale_step(30, 25) is None


def test_save_n_epoch_ratio(tmp_path):
    p = policy(tmp_path, save_n_epoch_ratio=3)
    assert p.every_n_epochs == 3  # floor(10 / 3)


def test_train_state_round_trip(tmp_path):
    write_train_state(tmp_path, epoch=2, step=17)
    assert read_train_state(tmp_path) == (2, 17)
    with pytest.raises(FileNotFoundError, match="train_state.json"):
        read_train_state(tmp_path / "missing")


@pytest.mark.parametrize("value,expected", [("0", 0), ("25", 25), ("0.1", 10), ("5%", 5), (None, 0)])
def test_resolve_steps(value, expected):
    assert resolve_steps(value, 100, "--lr_warmup_steps") == expected


def test_resolve_steps_rejects_garbage():
    with pytest.raises(ArgumentError, match="--lr_warmup_steps"):
        resolve_steps("ten", 100, "--lr_warmup_steps")


def test_optimizer_args_are_literals_and_classes_resolve():
    assert parse_kv_args(["betas=0.9,0.99", "weight_decay=0.01", "name=abc"], "--optimizer_args") == \
        {"betas": (0.9, 0.99), "weight_decay": 0.01, "name": "abc"}
    args = argparse.Namespace(optimizer_type="", optimizer_args=["weight_decay=0.1"])
    choice = choose_optimizer(args)
    assert choice.cls is torch.optim.AdamW and choice.describe() == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    assert choose_optimizer(argparse.Namespace(optimizer_type="torch.optim.Adam", optimizer_args=None)).cls \
        is torch.optim.Adam
    with pytest.raises(ArgumentError, match="unknown optimizer"):
        choose_optimizer(argparse.Namespace(optimizer_type="NoSuchOpt", optimizer_args=None))


def test_loss_log_flushes_in_blocks_and_stops_on_nan():
    logged = []
    log = LossLog(torch.device("cpu"), window=3, flush_every=4, log=lambda values, step: logged.append((step, values)))
    for step, value in enumerate([1.0, 2.0, 3.0], start=1):
        log.add(torch.tensor(value), step)
    assert logged == []  # nothing read back yet
    log.add(torch.tensor(4.0), 4)
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert logged[-1][1]["loss/average"] == pytest.approx(3.0)  # window of 3: (2+3+4)/3
    assert log.end_epoch() == pytest.approx(2.5)
    log.add(torch.tensor(float("nan")), 5)
    with pytest.raises(NonFiniteLossError, match="step 5"):
        log.flush()


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(20, seed=1), EpochShuffleSampler(20, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    order = list(a)
    assert order == list(b) and sorted(order) == list(range(20))
    b.set_epoch(4)
    assert list(b) != order
    a.skip_next(5)
    assert list(a) == order[5:]
    assert list(a) == order  # the skip applies once


def test_config_file_cli_wins_and_types_follow_the_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[a]\nnetwork_dim = 8\nlr_warmup_steps = 100\n[b]\nlearning_rate = 0.001\n')
    args = parse_args_with_config(setup_network_parser(), ["--config_file", str(cfg), "--network_dim", "4"])
    assert args.network_dim == 4 and args.learning_rate == 0.001
    assert args.lr_warmup_steps == "100"  # a str flag gets a str, as from the command line
    bad = tmp_path / "bad.toml"
    bad.write_text('mixed_precision = "fp8"\n')
    with pytest.raises(SystemExit):
        parse_args_with_config(setup_network_parser(), ["--config_file", str(bad)])


class _CountingScheduler:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("flags,first_step,skip", [
    (["--initial_step", "5"], 5, 0),
    (["--initial_step", "5", "--skip_until_initial_step"], 5, 2 * 2),  # 2 batches into epoch 2, x grad accum 2
    (["--initial_epoch", "3"], 6, 0),
])
def test_initial_step_and_epoch(tmp_path, flags, first_step, skip):
    from library.training.trainer import NetworkTrainer, Schedule

    args = setup_network_parser().parse_args(["--output_dir", str(tmp_path), "--gradient_accumulation_steps", "2",
                                              *flags])
    schedule = Schedule(steps_per_epoch=3, max_train_steps=12, num_epochs=4)
    lr = _CountingScheduler()
    NetworkTrainer(family=None).resume_or_start(args, accelerator=None, schedule=schedule, lr_scheduler=lr)
    assert (schedule.first_step, schedule.skip_batches, lr.steps) == (first_step, skip, first_step)
    assert schedule.first_epoch == first_step // 3


def test_initial_step_past_the_end_is_an_error(tmp_path):
    from library.training.trainer import NetworkTrainer, Schedule

    args = setup_network_parser().parse_args(["--output_dir", str(tmp_path), "--initial_step", "12"])
    with pytest.raises(ArgumentError, match="past --max_train_steps"):
        NetworkTrainer(family=None).resume_or_start(args, None, Schedule(3, 12, 4), _CountingScheduler())


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from library.io_utils import _UMASK, atomic_path

    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x")
    assert target.stat().st_mode & 0o777 == 0o666 & ~_UMASK
    assert not [p for p in os.listdir(tmp_path) if p != "out.bin"]


def test_an_unwritable_output_folder_is_refused_before_training(tmp_path):
    import pytest

    from library.args import ArgumentError
    from library.training.validation import check_writable_folder

    check_writable_folder(str(tmp_path / "new" / "out"), "--output_dir")  # may be created later: fine
    assert not (tmp_path / "new").exists()  # nothing is left behind by the check
    check_writable_folder(str(tmp_path), "--output_dir")
    assert not list(tmp_path.iterdir())
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(ArgumentError, match=r"--output_dir .*(is a file)"):
            check_writable_folder(str(bad), "--output_dir")


def test_background_model_hash_matches_and_notices_a_changed_file(tmp_path):
    import hashlib

    from library import io_utils
    from library.training import metadata

    model = tmp_path / "model.safetensors"
    model.write_bytes(bytes(range(256)) * 40_000)  # 10 MB
    args = argparse.Namespace(pretrained_model_name_or_path=str(model), vae=None)
    metadata.prefetch_model_hashes(args)
    assert str(model.resolve()) in io_utils._background  # started before the models load
    md = metadata.model_file_metadata(str(model), "sd")
    assert md["ss_new_sd_model_hash"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert str(model.resolve()) not in io_utils._background  # the result is used once
    io_utils.prefetch_sha256(model)
    io_utils._background[str(model.resolve())].join()
    model.write_bytes(b"changed after the hash started")
    assert io_utils.sha256_file(model) == hashlib.sha256(b"changed after the hash started").hexdigest()
