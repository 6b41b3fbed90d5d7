"""--fused_backward_pass / --fused_optimizer_groups: same weights as the plain loop, fewer live gradients."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from library.args import ArgumentError, setup_network_parser
from library.training.fused_backward import FusedBackward, check_fused_args, fused_from_args
from library.training.optimizer import choose_optimizer, make_lr_scheduler, make_optimizer

STEPS = 5
TOTAL = 10  # steps the LR schedules are built for


class Block(nn.Module):
    """Pre-norm residual MLP block; ``mix`` is applied twice, so its gradient has two contributions."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.mix = nn.Linear(width, width, bias=False)

    def forward(self, x):
        h = self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return x + self.mix(self.mix(h))


class Tiny(nn.Module):
    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.skipped = nn.Linear(width, width)  # used only when forward(skip=False)
        self.out = nn.Linear(width, 4)

    def forward(self, x, skip: bool = True):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        if not skip:
            h = h + self.skipped(h)
        return self.out(h)


def make_model(seed: int = 0, dtype=torch.float32) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def batches(n: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(6, 8, generator=g).to(dtype), torch.randn(6, 4, generator=g).to(dtype)) for _ in range(n)]


def loss_of(model, x, y, step: int, autocast: bool = False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, skip=step % 2 == 0)  # `skipped` gets a gradient only in odd steps
    return torch.nn.functional.mse_loss(out.float(), y.float())


def sched_args(**kw):
    base = dict(lr_scheduler="linear", lr_warmup_steps=3, lr_scheduler_args=None, lr_scheduler_type="",
                lr_decay_steps=0, lr_scheduler_num_cycles=1, lr_scheduler_power=1.0, lr_scheduler_min_lr_ratio=None,
                lr_scheduler_timescale=None, learning_rate=1e-2)
    return SimpleNamespace(**{**base, **kw})


def param_groups(model: Tiny, lr: float):
    """Two groups with their own lr, as the trainer's optimizer_params gives (U-Net / text encoder style)."""
    first = [p for n, p in model.named_parameters() if not n.startswith("blocks.3")]
    last = [p for n, p in model.named_parameters() if n.startswith("blocks.3")]
    return [{"params": first, "lr": lr}, {"params": last, "lr": lr / 2}]


def adafactor_factory(**kw):
    from transformers.optimization import Adafactor

    options = dict(relative_step=False, scale_parameter=False, warmup_init=False, lr=1e-2)
    options.update(kw)
    return lambda groups: Adafactor(groups, **options)


def adamw_factory(groups):
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01)


def plain_run(model, factory, data, *, sched=None, clip: str | None = None, max_norm: float = 0.0,
              autocast: bool = False, start: int = 0):
    """The reference loop: backward, (clip), optimizer.step, scheduler.step, zero_grad."""
    optimizer = factory(param_groups(model, 1e-2))
    scheduler = make_lr_scheduler(sched, optimizer, TOTAL) if sched else None
    for step, (x, y) in enumerate(data, start):
        loss_of(model, x, y, step, autocast).backward()
        if clip == "global":
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        elif clip == "param":
            for p in model.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_([p], max_norm)
        optimizer.step()
        if scheduler:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, scheduler


def fused_run(model, factory, data, *, mode, num_groups=None, sched=None, max_norm=0.0, autocast=False,
              start: int = 0, fused=None):
    if fused is None:
        fused = FusedBackward.create(param_groups(model, 1e-2), factory, mode=mode, num_groups=num_groups,
                                     max_grad_norm=max_norm,
                                     lr_scheduler_factory=(lambda o: make_lr_scheduler(sched, o, TOTAL))
                                     if sched else None)
    for step, (x, y) in enumerate(data, start):
        loss_of(model, x, y, step, autocast).backward()
        if mode == "fused_backward":
            assert all(p.grad is None for p in model.parameters()), "a gradient outlived its optimizer step"
        fused.finish_step()  # groups: a group waiting for the unused layer steps here
        assert all(p.grad is None for p in model.parameters()), "a gradient outlived its optimizer step"
    return fused


def assert_same_weights(a: nn.Module, b: nn.Module):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"{name} differs by {(pa - pb).abs().max().item():.3g}"


def assert_moved(model: nn.Module, start: nn.Module):
    for (name, p), p0 in zip(model.named_parameters(), start.parameters()):
        assert not torch.equal(p, p0), f"{name} was never updated"


# ================================================================ same weights as the plain loop
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_backward_adafactor_with_schedule_matches_plain_loop(autocast):
    # Bitwise: every parameter sees the same gradient and the same lr, and Adafactor updates each
    # parameter from its own gradient and state only, so narrowing its step() to one changes nothing.
    data, sched = batches(STEPS), sched_args()
    start = make_model()
    plain, fused = copy.deepcopy(start), copy.deepcopy(start)
    _, plain_sched = plain_run(plain, adafactor_factory(), data, sched=sched, autocast=autocast)
    f = fused_run(fused, adafactor_factory(), data, mode="fused_backward", sched=sched, autocast=autocast)
    assert_same_weights(plain, fused)
    assert_moved(fused, start)
    assert f.get_last_lr() == plain_sched.get_last_lr()
    assert f.get_last_lr()[0] == pytest.approx(1e-2 * (TOTAL - STEPS) / (TOTAL - 3))  # linear warmup 3, then decay


def test_fused_backward_from_the_flags_relative_step_adafactor():
    # The trainer's path: AdaFactor with its defaults (relative_step=True, lr schedule forced to adafactor:<lr>).
    args = setup_network_parser().parse_args(["--learning_rate", "1e-3", "--optimizer_type", "adafactor",
                                              "--max_grad_norm", "0"])
    args.fused_backward_pass, args.fused_optimizer_groups = True, None
    choice = choose_optimizer(args)
    data, start = batches(STEPS), make_model()
    plain, fused = copy.deepcopy(start), copy.deepcopy(start)
    assert args.lr_scheduler == "adafactor:0.001"
    optimizer = make_optimizer(choice, list(plain.parameters()), args.learning_rate)
    scheduler = make_lr_scheduler(args, optimizer, TOTAL)
    for step, (x, y) in enumerate(data):
        loss_of(plain, x, y, step).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    f = fused_from_args(args, list(fused.parameters()), choice, total_steps=TOTAL)
    assert f.mode == "fused_backward" and len(f.optimizers) == 1
    fused_run(fused, None, data, mode="fused_backward", fused=f)
    assert_same_weights(plain, fused)
    # the logged lr is Adafactor's relative step, as in the plain loop (not the initial 1e-3)
    # (min(1e-2, 1/sqrt(step)) x RMS of the first weight)
    assert f.get_last_lr() == scheduler.get_last_lr()
    assert f.get_last_lr()[0] != pytest.approx(1e-3)
    assert f.lr_schedulers[0].get_last_lr() == [1e-3]  # what AdafactorSchedule itself reports without gradients
    # fused_backward keeps the plain optimizer layout: its state loads into a plain optimizer as is
    optimizer.load_state_dict(f.optimizers[0].state_dict())


@pytest.mark.parametrize("num_groups", [1, 2, 4])
def test_fused_groups_adamw_match_plain_loop(num_groups):
    # Bitwise: AdamW is per parameter, so N optimizers over disjoint parts step like one over all of
    # them; the odd/even `skipped` layer checks that a group missing a gradient still steps (flush).
    data, sched = batches(STEPS), sched_args(lr_scheduler="cosine", lr_warmup_steps=2)
    start = make_model()
    plain, fused = copy.deepcopy(start), copy.deepcopy(start)
    _, plain_sched = plain_run(plain, adamw_factory, data, sched=sched)
    f = fused_run(fused, adamw_factory, data, mode="groups", num_groups=num_groups, sched=sched)
    assert len(f.optimizers) == num_groups == len(f.lr_schedulers)
    assert_same_weights(plain, fused)
    assert_moved(fused, start)
    assert f.get_last_lr() == pytest.approx(plain_sched.get_last_lr())
    assert f.lr_log_values(["unet", "te"]) == pytest.approx({"lr/unet": plain_sched.get_last_lr()[0],
                                                             "lr/te": plain_sched.get_last_lr()[1]})


def test_fused_backward_with_full_bf16_weights_matches_plain_loop():
    data = batches(STEPS, torch.bfloat16)
    start = make_model(dtype=torch.bfloat16)
    plain, fused = copy.deepcopy(start), copy.deepcopy(start)
    plain_run(plain, adafactor_factory(), data)
    fused_run(fused, adafactor_factory(), data, mode="fused_backward")
    assert_same_weights(plain, fused)
    assert_moved(fused, start)


# ========================================================================== --max_grad_norm
def test_fused_backward_clips_each_parameter_by_its_own_norm():
    data, start = batches(STEPS), make_model()
    per_param, global_clip, fused = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    sgd = lambda groups: torch.optim.SGD(groups, lr=0.1)  # noqa: E731 - SGD: clipping shows 1:1 in the weights
    plain_run(per_param, sgd, data, clip="param", max_norm=0.05)
    plain_run(global_clip, sgd, data, clip="global", max_norm=0.05)
    fused_run(fused, sgd, data, mode="fused_backward", max_norm=0.05)
    assert_same_weights(per_param, fused)
    assert any(not torch.equal(a, b) for a, b in zip(global_clip.parameters(), fused.parameters()))


def test_fused_groups_clip_by_the_group_norm_which_is_global_for_one_group():
    data, start = batches(STEPS), make_model()
    plain, fused = copy.deepcopy(start), copy.deepcopy(start)
    plain_run(plain, adamw_factory, data, clip="global", max_norm=0.05)
    fused_run(fused, adamw_factory, data, mode="groups", num_groups=1, max_norm=0.05)
    for a, b in zip(plain.parameters(), fused.parameters()):
        # the group norm is summed in another order than the global one: a last-bit difference
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ============================================================================ memory
def live_grad_peak(model: nn.Module, **fused_kw) -> int:
    """Most gradient bytes alive at once during one backward (sampled as each gradient arrives)."""
    params = list(model.parameters())
    peak = 0

    def probe(_):
        nonlocal peak
        peak = max(peak, sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    # registered first, so it runs before the fused hook of the same parameter frees the gradient
    handles = [p.register_post_accumulate_grad_hook(probe) for p in params]
    fused = FusedBackward.create(params, adamw_factory, **fused_kw) if fused_kw else None
    x, y = batches(1)[0]
    loss_of(model, x, y, 1).backward()
    for h in handles:
        h.remove()
    if fused:
        fused.finish_step()
        fused.remove()
    return peak


def test_fewer_gradients_alive_during_backward():
    model = Tiny(width=64, depth=8)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    total, largest = sum(sizes), max(sizes)
    assert live_grad_peak(copy.deepcopy(model)) == total  # plain: every gradient alive at the end
    assert live_grad_peak(copy.deepcopy(model), mode="fused_backward") == largest  # one at a time
    peaks = {n: live_grad_peak(copy.deepcopy(model), mode="groups", num_groups=n) for n in (1, 2, 4)}
    assert peaks[1] == total
    for n in (2, 4):
        assert peaks[n] <= total / n + 2 * largest, (n, peaks[n], total)
    assert peaks[4] < peaks[2] < peaks[1]


def test_groups_are_balanced_and_counted_from_the_end():
    model = Tiny(width=64, depth=8)
    f = FusedBackward.create(model.parameters(), adamw_factory, mode="groups", num_groups=4)
    sizes = [sum(p.numel() for g in o.param_groups for p in g["params"]) for o in f.optimizers]
    total = sum(p.numel() for p in model.parameters())
    assert all(abs(s - total / 4) < 0.15 * total for s in sizes), sizes
    assert f.optimizers[0].param_groups[0]["params"][-1] is model.out.bias  # first group: the output end
    assert f.optimizers[-1].param_groups[0]["params"][0] is model.inp.weight
    f.remove()


def test_frozen_parameters_are_kept_but_not_hooked():
    model = make_model()
    model.blocks[0].requires_grad_(False)
    before = copy.deepcopy(model.blocks[0].state_dict())
    fused_run(model, adamw_factory, batches(2), mode="groups", num_groups=3)
    assert all(torch.equal(before[k], v) for k, v in model.blocks[0].state_dict().items())


# ========================================================================== resume
@pytest.mark.parametrize("mode,num_groups,factory", [("fused_backward", None, adafactor_factory()),
                                                      ("groups", 2, adamw_factory)])
def test_state_dict_round_trip_resumes_exactly(mode, num_groups, factory):
    data, sched, k = batches(6), sched_args(), 3
    start = make_model()
    straight, resumed = copy.deepcopy(start), copy.deepcopy(start)

    def build(model):
        return FusedBackward.create(param_groups(model, 1e-2), factory, mode=mode, num_groups=num_groups,
                                    lr_scheduler_factory=lambda o: make_lr_scheduler(sched, o, TOTAL))

    fused_run(straight, factory, data, mode=mode, fused=build(straight))

    first = build(resumed)
    fused_run(resumed, factory, data[:k], mode=mode, fused=first)
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "fused": first.state_dict()}, buffer)
    first.remove()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    fresh = make_model(seed=99)  # other weights: everything must come from the saved state
    fresh.load_state_dict(saved["model"])
    second = build(fresh)
    second.load_state_dict(saved["fused"])
    fused_run(fresh, factory, data[k:], mode=mode, fused=second, start=k)
    assert_same_weights(straight, fresh)
    lr = 1e-2 * (TOTAL - 6) / (TOTAL - 3)  # the schedule continued too
    assert second.get_last_lr() == pytest.approx([lr, lr / 2])


def test_load_state_dict_refuses_another_layout():
    model = make_model()
    two = FusedBackward.create(model.parameters(), adamw_factory, mode="groups", num_groups=2)
    state = two.state_dict()
    two.remove()
    four = FusedBackward.create(model.parameters(), adamw_factory, mode="groups", num_groups=4)
    with pytest.raises(ValueError, match="2 optimizer groups, this run has 4"):
        four.load_state_dict(state)
    four.remove()
    fb = FusedBackward.create(model.parameters(), adafactor_factory(), mode="fused_backward")
    with pytest.raises(ValueError, match="fused mode 'groups'"):
        fb.load_state_dict(state)


def test_remove_restores_plain_backward():
    model = make_model()
    f = FusedBackward.create(model.parameters(), adamw_factory, mode="fused_backward")
    f.remove()
    before = copy.deepcopy(model.state_dict())
    x, y = batches(1)[0]
    loss_of(model, x, y, 0).backward()
    assert model.out.weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    f.zero_grad()
    assert model.out.weight.grad is None


# ========================================================================== arguments
def test_create_argument_errors():
    model = make_model()
    with pytest.raises(ValueError, match="num_groups is only for mode='groups'"):
        FusedBackward.create(model.parameters(), adamw_factory, mode="fused_backward", num_groups=2)
    with pytest.raises(ValueError, match="needs num_groups"):
        FusedBackward.create(model.parameters(), adamw_factory, mode="groups")
    with pytest.raises(ValueError, match="mode must be"):
        FusedBackward.create(model.parameters(), adamw_factory, mode="fused")
    with pytest.raises(ValueError, match="needs lr="):
        FusedBackward.create(model.parameters(), choose_optimizer(setup_network_parser().parse_args([])),
                             mode="fused_backward")


def flags(**kw):
    base = dict(fused_backward_pass=False, fused_optimizer_groups=None, optimizer_type="AdaFactor",
                gradient_accumulation_steps=1, mixed_precision="no", full_fp16=False, max_grad_norm=1.0,
                use_8bit_adam=False, use_lion_optimizer=False)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw,message", [
    (dict(fused_backward_pass=True, optimizer_type="AdamW"), "works only with --optimizer_type AdaFactor"),
    (dict(fused_backward_pass=True, optimizer_type="", use_8bit_adam=True), "got AdamW8bit"),
    (dict(fused_backward_pass=True, gradient_accumulation_steps=2), "--gradient_accumulation_steps 1"),
    (dict(fused_optimizer_groups=4, gradient_accumulation_steps=4), "--fused_optimizer_groups steps"),
    (dict(fused_backward_pass=True, mixed_precision="fp16"), "--fused_backward_pass cannot be used with fp16"),
    (dict(fused_optimizer_groups=2, full_fp16=True), "fp16"),
    (dict(fused_backward_pass=True, fused_optimizer_groups=2), "cannot be combined"),
    (dict(fused_optimizer_groups=0), "--fused_optimizer_groups must be at least 1"),
    (dict(fused_optimizer_groups=-3), "at least 1"),
    (dict(fused_optimizer_groups=2, deepspeed=True), "--deepspeed"),
])
def test_check_fused_args_errors(kw, message):
    with pytest.raises(ArgumentError, match=message):
        check_fused_args(flags(**kw))


def test_check_fused_args_accepts():
    assert check_fused_args(flags()) is None
    assert check_fused_args(flags(fused_backward_pass=True, optimizer_type="adafactor", mixed_precision="bf16")) \
        == "fused_backward"
    assert check_fused_args(flags(fused_optimizer_groups=1, optimizer_type="Lion")) == "groups"
    with pytest.raises(ArgumentError, match="single process"):
        check_fused_args(flags(fused_backward_pass=True), num_processes=2)
