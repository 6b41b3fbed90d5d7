"""--optimizer_type / --lr_scheduler: names to classes, missing packages, special rules, LR at given steps."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import types

import pytest
import torch

from library.args import ArgumentError, setup_network_parser
from library.training.optimizer import (
    OPTIMIZERS,
    choose_optimizer,
    is_schedule_free,
    lr_log_values,
    make_lr_scheduler,
    make_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
)

LR = 1e-3


def parse(*argv: str):
    return setup_network_parser().parse_args(["--learning_rate", str(LR), *argv])


def installed(module: str) -> bool:
    return importlib.util.find_spec(module.split(".")[0]) is not None


def tiny_optimizer(choice, lr: float = LR):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    return p, make_optimizer(choice, [{"params": [p], "lr": lr}], lr)


def lr_after(args, steps: int, total: int = 100) -> float:
    """The scheduler's learning rate after ``steps`` optimizer steps (what the trainer logs at step ``steps``)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=args.learning_rate)
    sched = make_lr_scheduler(args, opt, total)
    for _ in range(steps):
        opt.step()
        sched.step()
    return sched.get_last_lr()[0]


# ============================================================================== names -> classes
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_name_resolves_or_names_the_missing_package(name):
    spec = OPTIMIZERS[name]
    for spelling in (name, name.lower(), name.upper()):
        args = parse("--optimizer_type", spelling)
        if spec.package and not installed(spec.module):
            with pytest.raises(ArgumentError) as e:
                choose_optimizer(args)
            assert str(e.value) == (f"error: --optimizer_type {spelling} needs the {spec.package} package: "
                                    f"pip install {spec.package}")
            continue
        choice = choose_optimizer(args)
        assert choice.cls.__name__ == spec.attr
        assert choice.cls.__module__.startswith(spec.module)


def test_the_reference_spellings_map_to_the_expected_classes():
    expected = {
        "AdamW": "torch.optim.AdamW", "AdamW8bit": "bitsandbytes.optim.AdamW8bit",
        "PagedAdamW": "bitsandbytes.optim.PagedAdamW", "PagedAdamW8bit": "bitsandbytes.optim.PagedAdamW8bit",
        "PagedAdamW32bit": "bitsandbytes.optim.PagedAdamW32bit", "Lion": "lion_pytorch.Lion",
        "Lion8bit": "bitsandbytes.optim.Lion8bit", "PagedLion8bit": "bitsandbytes.optim.PagedLion8bit",
        "SGDNesterov": "torch.optim.SGD", "SGDNesterov8bit": "bitsandbytes.optim.SGD8bit",
        "DAdaptation": "dadaptation.experimental.DAdaptAdamPreprint",
        "DAdaptAdamPreprint": "dadaptation.experimental.DAdaptAdamPreprint",
        "DAdaptAdaGrad": "dadaptation.DAdaptAdaGrad", "DAdaptAdam": "dadaptation.DAdaptAdam",
        "DAdaptAdan": "dadaptation.DAdaptAdan", "DAdaptAdanIP": "dadaptation.experimental.DAdaptAdanIP",
        "DAdaptLion": "dadaptation.DAdaptLion", "DAdaptSGD": "dadaptation.DAdaptSGD", "Prodigy": "prodigyopt.Prodigy",
        "AdaFactor": "transformers.optimization.Adafactor", "RAdamScheduleFree": "schedulefree.RAdamScheduleFree",
        "AdamWScheduleFree": "schedulefree.AdamWScheduleFree", "SGDScheduleFree": "schedulefree.SGDScheduleFree",
    }
    assert {name: spec.path for name, spec in OPTIMIZERS.items()} == expected
    packages = {spec.package for spec in OPTIMIZERS.values()}
    assert packages == {None, "bitsandbytes", "lion-pytorch", "dadaptation", "prodigyopt", "schedulefree"}


@pytest.fixture
def fake_bitsandbytes(monkeypatch):
    """bitsandbytes needs CUDA here: a stand-in module checks the name -> class mapping and the kwargs."""
    bnb = types.ModuleType("bitsandbytes")
    optim = types.ModuleType("bitsandbytes.optim")
    for attr in ("AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit",
                 "SGD8bit"):
        setattr(optim, attr, type(attr, (torch.optim.SGD,), {"__module__": "bitsandbytes.optim"}))
    bnb.optim = optim
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", optim)
    return optim


def test_bitsandbytes_names_with_the_package_present(fake_bitsandbytes):
    for name, attr in [("AdamW8bit", "AdamW8bit"), ("pagedadamw", "PagedAdamW"), ("PagedAdamW8bit", "PagedAdamW8bit"),
                       ("PagedAdamW32bit", "PagedAdamW32bit"), ("Lion8bit", "Lion8bit"),
                       ("PagedLion8bit", "PagedLion8bit"), ("SGDNesterov8bit", "SGD8bit")]:
        assert choose_optimizer(parse("--optimizer_type", name)).cls is getattr(fake_bitsandbytes, attr)
    choice = choose_optimizer(parse("--optimizer_type", "SGDNesterov8bit", "--optimizer_args", "momentum=0.8"))
    assert choice.kwargs == {"nesterov": True, "momentum": 0.8}
    assert choice.describe() == "bitsandbytes.optim.SGD8bit(nesterov=True,momentum=0.8)"
    assert choose_optimizer(parse("--use_8bit_adam")).cls is fake_bitsandbytes.AdamW8bit


def test_bitsandbytes_missing_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ArgumentError, match=r"AdamW8bit needs the bitsandbytes package: pip install bitsandbytes$"):
        choose_optimizer(parse("--optimizer_type", "AdamW8bit"))
    with pytest.raises(ArgumentError, match="bitsandbytes package"):
        choose_optimizer(parse("--use_8bit_adam"))


def test_missing_optional_packages_are_reported(monkeypatch):
    for module, name, package in [("lion_pytorch", "Lion", "lion-pytorch"), ("prodigyopt", "Prodigy", "prodigyopt"),
                                  ("dadaptation", "DAdaptAdam", "dadaptation"),
                                  ("dadaptation", "DAdaptation", "dadaptation"),
                                  ("schedulefree", "AdamWScheduleFree", "schedulefree")]:
        monkeypatch.setitem(sys.modules, module, None)
        monkeypatch.setitem(sys.modules, f"{module}.experimental", None)
        with pytest.raises(ArgumentError) as e:
            choose_optimizer(parse("--optimizer_type", name))
        assert str(e.value) == f"error: --optimizer_type {name} needs the {package} package: pip install {package}"


def test_defaults_bare_names_dotted_paths_and_metadata():
    assert choose_optimizer(parse()).cls is torch.optim.AdamW
    assert choose_optimizer(parse("--optimizer_type", "Adam")).cls is torch.optim.Adam  # bare = torch.optim.X
    assert choose_optimizer(parse("--optimizer_type", "rmsprop")).cls is torch.optim.RMSprop
    assert choose_optimizer(parse("--optimizer_type", "torch.optim.Adagrad")).cls is torch.optim.Adagrad
    choice = choose_optimizer(parse("--optimizer_type", "SGDNesterov", "--optimizer_args", "weight_decay=0.01"))
    assert choice.describe() == "torch.optim.sgd.SGD(nesterov=True,momentum=0.9,weight_decay=0.01)"
    choice = choose_optimizer(parse("--optimizer_args", "betas=0.9,0.99", "eps=1e-6"))
    assert choice.kwargs == {"betas": (0.9, 0.99), "eps": 1e-6}
    assert choice.describe() == "torch.optim.adamw.AdamW(betas=(0.9, 0.99),eps=1e-06)"
    with pytest.raises(ArgumentError, match="unknown optimizer"):
        choose_optimizer(parse("--optimizer_type", "NoSuchOptimizer"))
    with pytest.raises(ArgumentError, match="cannot import no_such_pkg .*No module named 'no_such_pkg'"):
        choose_optimizer(parse("--optimizer_type", "no_such_pkg.Opt"))
    with pytest.raises(ArgumentError, match="torch.optim.NoSuch does not exist"):
        choose_optimizer(parse("--optimizer_type", "torch.optim.NoSuch"))
    with pytest.raises(ArgumentError, match="--optimizer_args"):
        tiny_optimizer(choose_optimizer(parse("--optimizer_args", "no_such_kwarg=1")))


def test_legacy_flags():
    if installed("lion_pytorch"):
        assert choose_optimizer(parse("--use_lion_optimizer")).cls.__name__ == "Lion"
        assert choose_optimizer(parse("--use_lion_optimizer", "--optimizer_type", "lion")).cls.__name__ == "Lion"
    with pytest.raises(ArgumentError, match="--use_lion_optimizer conflicts with --optimizer_type AdamW"):
        choose_optimizer(parse("--use_lion_optimizer", "--optimizer_type", "AdamW"))
    with pytest.raises(ArgumentError, match="--use_8bit_adam conflicts with --optimizer_type Lion"):
        choose_optimizer(parse("--use_8bit_adam", "--optimizer_type", "Lion"))
    with pytest.raises(ArgumentError, match="cannot be combined"):
        choose_optimizer(parse("--use_8bit_adam", "--use_lion_optimizer"))


# ====================================================================== constructed and stepped
STEPPABLE = [name for name, spec in OPTIMIZERS.items() if spec.package != "bitsandbytes"]


@pytest.mark.parametrize("name", STEPPABLE)
def test_each_installed_optimizer_steps(name):
    spec = OPTIMIZERS[name]
    if spec.package:
        pytest.importorskip(spec.module.split(".")[0])
    args = parse("--optimizer_type", name, "--learning_rate", "0.1")
    choice = choose_optimizer(args)
    p, opt = tiny_optimizer(choice, lr=0.1)
    sched = make_lr_scheduler(args, opt, 10)
    before = p.detach().clone()
    for _ in range(8):  # RAdam-style rectification holds the first few steps back
        p.grad = p.detach().clone()  # gradient of |p|^2 / 2
        opt.step()
        sched.step()
        opt.zero_grad()
    assert not torch.equal(p.detach(), before), name
    assert torch.isfinite(p).all()
    assert choice.describe().startswith(f"{type(opt).__module__}.{type(opt).__name__}")


# ========================================================================================== Adafactor
def test_adafactor_relative_step_forces_its_schedule(caplog):
    args = parse("--optimizer_type", "AdaFactor", "--lr_scheduler", "cosine")
    with caplog.at_level(logging.WARNING):
        choice = choose_optimizer(args)
    assert "lr_scheduler cosine is replaced by adafactor:0.001" in caplog.text
    assert choice.kwargs == {"relative_step": True} and not choice.pass_lr
    assert args.lr_scheduler == f"adafactor:{LR}"
    assert choice.describe() == "transformers.optimization.Adafactor(relative_step=True)"
    p, opt = tiny_optimizer(choice)
    assert opt.defaults["lr"] is None  # the optimizer computes its own relative step
    sched = make_lr_scheduler(args, opt, 10)
    from transformers.optimization import AdafactorSchedule

    assert isinstance(sched, AdafactorSchedule)
    rms = p.detach().pow(2).mean().sqrt().item()
    p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    # relative step at step 1: min(1e-2, 1/sqrt(1)), times the parameter's RMS (scale_parameter=True)
    assert sched.get_last_lr()[0] == pytest.approx(1e-2 * rms, rel=1e-5)
    assert lr_log_values(opt, sched, ["unet"])["lr/unet"] == pytest.approx(1e-2 * rms, rel=1e-5)


def test_adafactor_default_scheduler_is_replaced_silently(caplog):
    args = parse("--optimizer_type", "adafactor")
    with caplog.at_level(logging.WARNING):
        choose_optimizer(args)
    assert args.lr_scheduler == f"adafactor:{LR}" and "replaced" not in caplog.text


def test_adafactor_without_relative_step_keeps_the_chosen_schedule():
    args = parse("--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                 "--lr_scheduler", "cosine")
    choice = choose_optimizer(args)
    assert args.lr_scheduler == "cosine" and choice.pass_lr
    _, opt = tiny_optimizer(choice)
    assert opt.defaults["lr"] == LR
    assert lr_after(args, 50) == pytest.approx(LR / 2)
    with pytest.raises(ArgumentError, match="relative_step=True"):
        choose_optimizer(parse("--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False",
                               "--lr_scheduler", "adafactor"))
    with pytest.raises(ArgumentError, match="only for --optimizer_type AdaFactor"):
        lr_after(parse("--lr_scheduler", "adafactor"), 1)


# ================================================================================ schedule-free
class FakeScheduleFree(torch.optim.SGD):
    """A schedule-free-like optimizer without the package: eval() moves the weights, train() moves them back."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group["train_mode"] = False

    def eval(self):
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    p.data.add_(100.0)
                group["train_mode"] = False

    def train(self):
        for group in self.param_groups:
            if not group["train_mode"]:
                for p in group["params"]:
                    p.data.sub_(100.0)
                group["train_mode"] = True


def test_schedule_free_rules_without_the_package(caplog):
    args = parse("--optimizer_type", f"{__name__}.FakeScheduleFree", "--lr_scheduler", "cosine")
    choice = choose_optimizer(args)
    assert choice.schedule_free
    p, opt = tiny_optimizer(choice)
    assert is_schedule_free(opt) and opt.param_groups[0]["train_mode"]  # make_optimizer switched it to train
    start = p.detach().clone()
    with caplog.at_level(logging.WARNING):
        sched = make_lr_scheduler(args, opt, 10)
    assert "needs no schedule" in caplog.text
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == [LR]  # cosine was replaced by a constant stand-in
    with optimizer_eval_mode(opt):
        assert torch.equal(p.detach(), start + 100) and not opt.param_groups[0]["train_mode"]
        with optimizer_eval_mode(opt):  # nested: stays in eval mode
            assert not opt.param_groups[0]["train_mode"]
        assert not opt.param_groups[0]["train_mode"]
    assert torch.equal(p.detach(), start) and opt.param_groups[0]["train_mode"]
    opt.eval()  # e.g. a state written in eval mode and loaded
    optimizer_train_mode(opt)
    assert opt.param_groups[0]["train_mode"]


def test_eval_mode_leaves_other_optimizers_alone():
    p, opt = tiny_optimizer(choose_optimizer(parse()))
    with optimizer_eval_mode(opt):
        pass
    with optimizer_eval_mode(None):
        pass
    assert not is_schedule_free(opt)


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"])
def test_schedulefree_package_eval_and_train(name):
    pytest.importorskip("schedulefree")
    args = parse("--optimizer_type", name, "--lr_scheduler", "linear")
    choice = choose_optimizer(args)
    p, opt = tiny_optimizer(choice, lr=0.1)
    sched = make_lr_scheduler(args, opt, 10)
    for _ in range(8):
        p.grad = p.detach().clone()
        opt.step()
        sched.step()
    assert sched.get_last_lr() == [0.1]
    train_weights = p.detach().clone()
    with optimizer_eval_mode(opt):
        assert not torch.allclose(p.detach(), train_weights)  # the averaged (x) point
    assert torch.allclose(p.detach(), train_weights, atol=1e-6)
    p.grad = p.detach().clone()
    opt.step()  # still steppable: back in train mode


def test_eval_mode_through_accelerate_wrapper():
    pytest.importorskip("schedulefree")
    from accelerate import Accelerator

    p = torch.nn.Parameter(torch.ones(3))
    args = parse("--optimizer_type", "AdamWScheduleFree")
    opt = Accelerator(cpu=True).prepare(make_optimizer(choose_optimizer(args), [p], 0.1))
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert is_schedule_free(opt)
    with optimizer_eval_mode(opt):
        assert not opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["train_mode"]


# ==================================================================================== LR logging
def test_lr_log_values_names_and_d_times_lr():
    p1, p2 = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1e-4}, {"params": [p2], "lr": 1e-5}], lr=1e-3)
    sched = make_lr_scheduler(parse(), opt, 10)
    assert lr_log_values(opt, sched, ["textencoder", "unet"]) == {"lr/textencoder": 1e-4, "lr/unet": 1e-5}
    assert lr_log_values(opt, sched, None) == {"lr/group0": 1e-4, "lr/group1": 1e-5}
    assert lr_log_values(opt, sched, ["only_one"]) == {"lr/group0": 1e-4, "lr/group1": 1e-5}
    for group, d in zip(opt.param_groups, (2.0, 3.0)):  # what D-Adaptation / Prodigy keep per group
        group["d"] = d
    assert lr_log_values(opt, sched, ["te", "unet"]) == {
        "lr/te": 1e-4, "lr/unet": 1e-5, "lr/d*lr/te": pytest.approx(2e-4), "lr/d*lr/unet": pytest.approx(3e-5)}


def test_prodigy_logs_d_times_lr():
    pytest.importorskip("prodigyopt")
    args = parse("--optimizer_type", "Prodigy", "--learning_rate", "1.0")
    p, opt = tiny_optimizer(choose_optimizer(args), lr=1.0)
    sched = make_lr_scheduler(args, opt, 10)
    for _ in range(3):
        p.grad = p.detach().clone()
        opt.step()
        sched.step()
    logs = lr_log_values(opt, sched, ["unet"])
    assert logs["lr/unet"] == 1.0
    assert logs["lr/d*lr/unet"] == pytest.approx(opt.param_groups[0]["d"] * 1.0) and logs["lr/d*lr/unet"] > 0


# ================================================================================== LR schedules
def cos_half(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("flags,step,expected", [
    ([], 37, LR),
    (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], 3, LR),  # constant ignores warmup
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.2"], 5, LR * 5 / 20),
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.2"], 30, LR),
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "10%"], 5, LR * 0.5),
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "10%"], 55, LR * 45 / 90),
    (["--lr_scheduler", "cosine"], 50, LR / 2),
    (["--lr_scheduler", "cosine"], 25, LR * cos_half(0.25)),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "20"], 60, LR / 2),
    (["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2"], 25, LR / 2),
    (["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2"], 50, LR),  # restart
    (["--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"], 50, (LR - 1e-7) * 0.25 + 1e-7),
    (["--lr_scheduler", "polynomial", "--lr_scheduler_power", "1", "--lr_scheduler_args", "lr_end=1e-4"], 50,
     (LR - 1e-4) * 0.5 + 1e-4),
    (["--lr_scheduler", "inverse_sqrt", "--lr_scheduler_timescale", "10"], 30, LR / math.sqrt(40 / 10)),
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10"], 5, LR * 0.5),
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10"], 30, LR / math.sqrt(30 / 10)),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"], 50, LR * (0.1 + 0.9 * 0.5)),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"], 100, LR * 0.1),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1",
      "--lr_scheduler_num_cycles", "2"], 50, LR * 0.1),  # two half-cosines: the minimum half-way
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "10", "--lr_decay_steps", "20%",
      "--lr_scheduler_min_lr_ratio", "0.1"], 5, LR * (0.1 + 0.9 * 0.5)),  # warmup starts from the minimum
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "10", "--lr_decay_steps", "20%",
      "--lr_scheduler_min_lr_ratio", "0.1"], 60, LR),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "10", "--lr_decay_steps", "0.2",
      "--lr_scheduler_min_lr_ratio", "0.1"], 90, LR * (0.1 + 0.9 * 0.5)),
    (["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:10,0.1:20,0.01"], 5, LR),
    (["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:10,0.1:20,0.01"], 15, LR * 0.1),
    (["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules=1:10,0.1:20,0.01"], 25, LR * 0.01),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "step_size=2", "gamma=0.5"],
     4, LR * 0.25),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "gamma=0.5"], 5, LR * 0.25),
    (["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=10"], 5, LR / 2),
])
def test_schedule_from_flags(flags, step, expected):
    assert lr_after(parse(*flags), step) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_schedule_errors():
    with pytest.raises(ArgumentError, match="unknown"):
        lr_after(parse("--lr_scheduler", "no_such_schedule"), 1)
    with pytest.raises(ArgumentError, match="needs a metric"):
        lr_after(parse("--lr_scheduler", "reduce_lr_on_plateau"), 1)
    with pytest.raises(ArgumentError, match="--lr_scheduler_min_lr_ratio"):
        lr_after(parse("--lr_scheduler", "cosine_with_min_lr"), 1)
    with pytest.raises(ArgumentError, match="exceed the 100 steps"):
        lr_after(parse("--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "60", "--lr_decay_steps", "50"), 1)
    with pytest.raises(ArgumentError, match="step_rules"):
        lr_after(parse("--lr_scheduler", "piecewise_constant"), 1)
    with pytest.raises(ArgumentError, match="--lr_scheduler_type NoSuchLR"):
        lr_after(parse("--lr_scheduler_type", "NoSuchLR"), 1)
    with pytest.raises(ArgumentError, match="--lr_scheduler_args"):
        lr_after(parse("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "gamma=0.5"), 1)
    with pytest.raises(ArgumentError, match="does not take no_such"):
        lr_after(parse("--lr_scheduler", "cosine", "--lr_scheduler_args", "no_such=1"), 1)
    with pytest.raises(ArgumentError, match="--lr_warmup_steps"):
        lr_after(parse("--lr_scheduler", "linear", "--lr_warmup_steps", "ten"), 1)


def test_flags_have_the_reference_defaults():
    args = setup_network_parser().parse_args([])
    assert (args.optimizer_type, args.optimizer_args, args.lr_scheduler, args.lr_warmup_steps, args.lr_decay_steps,
            args.lr_scheduler_num_cycles, args.lr_scheduler_power, args.lr_scheduler_timescale,
            args.lr_scheduler_min_lr_ratio, args.lr_scheduler_type, args.lr_scheduler_args, args.use_8bit_adam,
            args.use_lion_optimizer, args.max_grad_norm, args.learning_rate) == \
        ("", None, "constant", "0", "0", 1, 1, None, None, "", None, False, False, 1.0, 2e-6)


# ====================================================================================== end to end
def test_a_missing_optimizer_package_stops_the_script_before_loading(tmp_path):
    from tests.train_helpers import run_script

    model = tmp_path / "not_a_model.safetensors"
    model.write_bytes(b"")  # never read: the optimizer is checked first
    proc = run_script("train_network.py", ["--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "out",
                                           "--train_data_dir", tmp_path / "none", "--network_module", "networks.lora",
                                           "--optimizer_type", "no_such_optimizer_pkg.Opt"], expect_ok=False)
    assert proc.returncode != 0
    output = proc.stderr + proc.stdout
    assert "--optimizer_type no_such_optimizer_pkg.Opt: cannot import no_such_optimizer_pkg" in output
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_logged_learning_rates_follow_the_schedule(tmp_path, tiny_sd1_ckpt):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from library.demo.shapes import write_shapes_folder
    from tests.train_helpers import base_train_args, run_script

    write_shapes_folder(tmp_path / "train" / "1_sks", 4, seed=3, trigger="sks")
    total, warmup, cycles = 10, 2, 2  # 0.2 x 10 steps of warmup
    run_script("train_network.py", base_train_args(
        tiny_sd1_ckpt, tmp_path / "out", train_data_dir=tmp_path / "train", caption_extension=".txt",
        max_train_steps=total, optimizer_type="SGDNesterov", lr_scheduler="cosine_with_restarts",
        lr_warmup_steps=0.2, lr_scheduler_num_cycles=cycles, learning_rate=1e-2, unet_lr=1e-2,
        text_encoder_lr=5e-3, logging_dir=tmp_path / "logs"))
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()

    def expected(step: int, base: float) -> float:  # the value after `step` optimizer steps
        if step < warmup:
            return base * step / warmup
        progress = (step - warmup) / (total - warmup)
        return 0.0 if progress >= 1 else base * 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1)))

    for tag, base in [("lr/unet", 1e-2), ("lr/textencoder", 5e-3)]:
        scalars = acc.Scalars(tag)
        assert [e.step for e in scalars] == list(range(1, total + 1))
        for e in scalars:
            assert e.value == pytest.approx(expected(e.step, base), rel=1e-5, abs=1e-9), (tag, e.step)
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("lr/d*lr")]  # SGD has no d estimate


@pytest.mark.slow
def test_schedule_free_run_saves_in_eval_mode_and_resumes_exactly(tmp_path, tiny_sd1_ckpt):
    """Saves mid-run switch to eval() and back (the run would stop at the next step otherwise), and a
    resume from a state written in eval mode ends with the weights of the uninterrupted run."""
    pytest.importorskip("schedulefree")
    from safetensors.torch import load_file

    from library.demo.shapes import write_shapes_folder
    from tests.train_helpers import base_train_args, run_script

    write_shapes_folder(tmp_path / "train" / "1_sks", 4, seed=3, trigger="sks")
    common = dict(train_data_dir=tmp_path / "train", caption_extension=".txt", max_train_steps=4,
                  optimizer_type="AdamWScheduleFree", learning_rate=1e-2, lr_scheduler="cosine")
    full = tmp_path / "full"
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, full, save_every_n_steps=2, save_state=True,
                                                   **common))
    state = full / "lora-step00000002-state"
    assert (state / "train_state.json").exists()
    saved = torch.load(state / "optimizer.bin", map_location="cpu", weights_only=False)
    assert saved["param_groups"][0]["train_mode"] is False  # the state was written in eval mode
    resumed = tmp_path / "resumed"
    run_script("train_network.py", base_train_args(tiny_sd1_ckpt, resumed, resume=state, **common))
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    mid = load_file(str(full / "lora-step00000002.safetensors"))
    assert any(not torch.equal(mid[k], a[k]) for k in a)
