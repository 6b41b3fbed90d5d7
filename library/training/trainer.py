"""Trainer: the training loop of every trainer script (networks, fine-tuning, DreamBooth), written once.

Read top to bottom, :meth:`Trainer.train` is the recipe: check flags, set up accelerate, read the
data (a bad dataset fails before any model loads), load the family's models, cache latents (and
text-encoder outputs), create what is trained, build the optimizer, then loop over epochs and
steps, saving and sampling on schedule. Everything that depends on the model family goes through ``self.family``
(:class:`library.families.base.ModelFamily`); everything that depends on what is trained (a
``--network_module`` network through the kohya plug-in API, or the model itself) goes through
``self.target`` (:class:`library.training.targets.TrainingTarget`). ``NetworkTrainer(family)`` is the
trainer of the ``*_train_network.py`` scripts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from library.args import ArgumentError
from library.families.base import FamilyModels, ModelFamily
from library.log import setup_logging
from library.training import metadata as md
from library.training.accelerator import (allow_fp16_gradients, make_accelerator, prepare_trained, store_in_fp8,
                                          weight_dtypes)
from library.training.data_order import EpochShuffleSampler, make_dataloader
from library.training.fused_backward import FusedOptimizerView, FusedSchedulerView, fused_from_args
from library.training.interrupt import InterruptFlag, TrainingInterrupted
from library.training.loss import LossConfig, prediction_loss
from library.training.loss_log import LossLog
from library.training.network_extras import MaxNormLog
from library.training.optimizer import (choose_optimizer, lr_log_values, make_lr_scheduler, make_optimizer,
                                        optimizer_eval_mode, optimizer_train_mode, steps_per_epoch)
from library.training.saving import SavePolicy, read_train_state, saved_optimizer, write_train_state
from library.training.targets import NetworkTarget, TrainingTarget
from library.training import trackers
from library.training.validation_loss import ValidationRunner, ValidationSettings, family_batch_losses
from library.training.validation import check_resume_state_fits, validate_training_args

logger = logging.getLogger(__name__)


@dataclass
class Schedule:
    """How long the run is, in optimizer steps and epochs, and where it starts."""

    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    first_step: int = 0
    skip_batches: int = 0  # batches of the first epoch already seen (exact resume)

    @property
    def first_epoch(self) -> int:
        return self.first_step // self.steps_per_epoch


def caches_text_encoder_outputs(args) -> bool:
    """``--cache_text_encoder_outputs`` (or ``_to_disk``); absent from parsers without the flags."""
    return bool(getattr(args, "cache_text_encoder_outputs", False)
                or getattr(args, "cache_text_encoder_outputs_to_disk", False))


def _rng_devices(accelerator) -> list:
    """The CUDA devices whose random state :func:`torch.random.fork_rng` must save (none on CPU)."""
    device = accelerator.device
    return [device] if getattr(device, "type", None) == "cuda" else []


def _place(model: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move a model; cast only when the dtype really changes (diffusers warns on every cast)."""
    model.to(device)
    if next(model.parameters()).dtype != dtype:
        model.to(dtype=dtype)


class Trainer:
    #: an in-memory latent cache that took this long is worth a hint about --cache_latents_to_disk
    CACHE_TO_DISK_HINT_S = 20.0

    def __init__(self, family: ModelFamily, target: TrainingTarget):
        self.family = family
        self.target = target
        self.lr_names: list[str] | None = None
        self.optimizer = None  # set by train(): schedule-free optimizers switch to eval() around saves/samples
        self.optimizer_class: str | None = None  # class path, written into saved states and checked on resume
        self.loss_config: LossConfig | None = None  # built once from args in train()
        self.validator: ValidationRunner | None = None  # set by train() when there is a validation set
        self.fused_clipping = False  # True when --fused_* optimizers clip inside the backward pass
        self.interrupt: InterruptFlag | None = None  # set while the loop runs: Ctrl-C stops at a step boundary
        self.first_use_latents = None  # a LatentsOnFirstUse with --cache_latents_on_first_use

    # ============================================================================ the recipe
    def train(self, args) -> None:
        setup_logging(args)
        self.target.validate_args(args)  # first: a fine-tune tells the shared checks whether the TEs train
        validate_training_args(args)
        self.family.validate_args(args)
        cache_te = caches_text_encoder_outputs(args)
        if cache_te and self.family.text_encoder_cache_suffix is None:
            raise ArgumentError(f"--cache_text_encoder_outputs: this model family ({type(self.family).__name__}) "
                                "cannot cache text encoder outputs; drop --cache_text_encoder_outputs(_to_disk)")
        optimizer_choice = choose_optimizer(args)  # a missing optimizer package fails before any loading
        self.optimizer_class = optimizer_choice.class_path
        if args.sample_prompts:  # a bad prompt file fails now, not at the first preview hours later
            from library.sampling.prompts import load_prompts

            load_prompts(args.sample_prompts, defaults=self.family.sample_defaults(args),
                         samplers=self.family.sampler_names)
        self.loss_config = LossConfig.from_args(args)
        if args.seed is None:
            args.seed = random.randint(0, 2**31 - 1)
            logger.info("no --seed given; using %d", args.seed)
        set_seed(args.seed)
        started_at = time.time()

        accelerator = make_accelerator(args)
        weight_dtype, save_dtype = weight_dtypes(args)
        from library.dataset_config import build_dataset_group  # data stack only when training

        def build_data(tokenize):
            return build_dataset_group(args, tokenize=tokenize, latents_stride=self.family.latents_stride,
                                       bucket_reso_steps_multiple=self.family.bucket_reso_multiple,
                                       conditioning_images=self.target.needs_conditioning_images)

        # The data (image headers, captions) is read before the models load, so a bad dataset fails in
        # seconds; the tokenizer the workers need is attached once loaded. A --dataset_class receives its
        # tokenize function when it is built, so it is built after loading.
        early_data = None if getattr(args, "dataset_class", None) else build_data(None)
        if not getattr(args, "no_metadata", False):  # the file hashes of the metadata: computed while loading
            md.prefetch_model_hashes(args)
        models = self.family.load_models(args, accelerator.device, weight_dtype)
        tokenize = self.family.make_tokenize_fn(models, args)
        # With cached text-encoder outputs the batches need no token ids: the workers do not tokenize.
        worker_tokenize = None if cache_te else tokenize
        train_group, val_group = early_data or build_data(worker_tokenize)
        groups = [g for g in (train_group, val_group) if g is not None]
        if early_data is not None:
            for group in groups:
                group.tokenize = worker_tokenize
        self.target.prepare_data(args, self.family, models, groups)  # e.g. textual inversion's token strings
        if args.debug_dataset:
            from library.data.dataset import debug_dataset

            debug_dataset(train_group)
            return
        if len(train_group) == 0:
            raise ArgumentError("the dataset has no batches: check image folders and num_repeats")
        if cache_te:  # before any caching: a subset that shuffles captions fails now, not after the VAE pass
            self.verify_text_encoder_caching(groups)
        # Caching draws random numbers (the VAE posterior sample) only when a cache is (re)built; the
        # training's random stream must not depend on whether the files already existed.
        with torch.random.fork_rng(devices=_rng_devices(accelerator)):
            if args.cache_latents:
                for group in groups:
                    if group is train_group and getattr(args, "cache_latents_on_first_use", False):
                        self.first_use_latents = self.start_latents_on_first_use(args, models, group, accelerator)
                    else:  # the validation set is cached up front: it is read whole at every validation
                        self.cache_latents(args, models, group, accelerator)
            if cache_te:
                self.cache_text_encoder_outputs(args, models, tokenize, groups, accelerator, weight_dtype)

        target = self.target
        target.create(args, self.family, models)
        if args.resume:  # a state of another model or network: one line now, not accelerate's key dump later
            check_resume_state_fits(args.resume, target.modules())
        self.prepare_models_for_training(args, models, accelerator, weight_dtype)

        params, self.lr_names = target.optimizer_params(args)

        num_workers = min(args.max_data_loader_n_workers, os.cpu_count() or 1)
        from library.data.collate import collate_batch

        dataloader = make_dataloader(train_group, seed=args.seed, num_workers=num_workers,
                                     persistent_workers=args.persistent_data_loader_workers, collate_fn=collate_batch)
        schedule = self.make_schedule(args, len(dataloader), accelerator.num_processes)
        train_group.set_max_train_steps(schedule.max_train_steps)
        total_steps = schedule.max_train_steps * accelerator.num_processes

        if args.full_fp16 or args.full_bf16:
            target.cast_for_full_precision(weight_dtype)
        fused = fused_from_args(args, params, optimizer_choice, total_steps=total_steps,
                                num_processes=accelerator.num_processes)
        if fused is None:
            optimizer = make_optimizer(optimizer_choice, params, args.learning_rate)
            lr_scheduler = make_lr_scheduler(args, optimizer, total_steps)
            prepared, (optimizer, dataloader, lr_scheduler) = prepare_trained(accelerator, target.modules(), optimizer,
                                                                              dataloader, lr_scheduler)
        else:
            # Updates happen inside backward(): accelerate must not wrap the optimizers, only save them.
            prepared, (dataloader,) = prepare_trained(accelerator, target.modules(), dataloader)
            accelerator.register_for_checkpointing(fused)
            optimizer, lr_scheduler = FusedOptimizerView(fused), FusedSchedulerView(fused)
        self.fused_clipping = fused is not None  # --max_grad_norm is applied inside the fused steps
        target.set_prepared(prepared, accelerator)
        if args.full_fp16:
            allow_fp16_gradients(accelerator)

        policy = SavePolicy.from_args(args, schedule.num_epochs)
        self.resume_or_start(args, accelerator, schedule, lr_scheduler)
        self.optimizer = optimizer
        optimizer_train_mode(optimizer)  # a state is saved in eval mode; stepping needs train mode

        base_metadata = self.build_metadata(args, train_group, schedule, started_at, optimizer_choice.describe(),
                                            target.metadata_args(), accelerator,
                                            num_validation_images=val_group.num_train_images if val_group else 0)
        if accelerator.is_main_process and trackers.uses_trackers(args):
            trackers.login_wandb(args)
            accelerator.init_trackers(args.log_tracker_name or self.family.tracker_name,
                                      config=self.tracker_config(args) if args.log_config else None,
                                      init_kwargs=trackers.tracker_init_kwargs(args))
        if val_group is not None:
            self.validator = self.make_validator(args, accelerator, models, val_group, schedule)

        with InterruptFlag(check_every=LossLog.FLUSH_EVERY) as self.interrupt:
            self.loop(args, accelerator, models, optimizer, lr_scheduler, dataloader, train_group, schedule, policy,
                      base_metadata, save_dtype, weight_dtype)

    # ================================================================================= set-up
    def cache_latents(self, args, models: FamilyModels, group, accelerator) -> None:
        vae = models.vae
        vae.to(accelerator.device)
        encode = lambda images: self.family.encode_images(models, images.to(accelerator.device))  # noqa: E731
        options = dict(vae_batch_size=args.vae_batch_size, to_disk=args.cache_latents_to_disk,
                       skip_cache_check=args.skip_cache_check, cache_suffix=self.family.latent_cache_suffix,
                       suffixed_keys=self.family.latent_cache_suffixed_keys)
        started = time.monotonic()
        with torch.no_grad():
            if args.cache_latents_to_disk and accelerator.num_processes > 1:  # each process writes its share
                group.cache_latents(encode, process_index=accelerator.process_index,
                                    num_processes=accelerator.num_processes, **options)
                accelerator.wait_for_everyone()
            encoded = group.cache_latents(encode, **options)
        seconds = time.monotonic() - started
        if encoded and not args.cache_latents_to_disk and seconds >= self.CACHE_TO_DISK_HINT_S:
            # The VAE pass is often most of the start (sd15 on two CPU cores: 29 of 52 s); say how to pay it once.
            logger.info("caching the latents of %d images took %.0f s; with --cache_latents_to_disk the next run on "
                        "these images (and a --resume) reads them from disk instead, and with "
                        "--cache_latents_on_first_use training starts before they are all encoded", encoded, seconds)
        vae.to("cpu")  # the VAE is not needed again until sampling: free the device memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def start_latents_on_first_use(self, args, models: FamilyModels, group, accelerator):
        """The cache that batches fill as they need it (``--cache_latents_on_first_use``); the VAE stays
        on the device until every image is cached."""
        from library.data.first_use import LatentsOnFirstUse

        if not hasattr(group, "latent_image_loader"):
            raise ArgumentError(f"--cache_latents_on_first_use: {type(group).__name__} (--dataset_class) does not "
                                "support it; use --cache_latents")
        vae = models.vae

        def encode(images: torch.Tensor) -> torch.Tensor:
            vae.to(accelerator.device)  # a no-op unless sampling moved it back to the CPU
            return self.family.encode_images(models, images.to(accelerator.device))

        def release_vae() -> None:
            vae.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        return LatentsOnFirstUse(group, encode, seed=args.seed, to_disk=args.cache_latents_to_disk,
                                 skip_cache_check=args.skip_cache_check, cache_suffix=self.family.latent_cache_suffix,
                                 suffixed_keys=self.family.latent_cache_suffixed_keys,
                                 rng_devices=_rng_devices(accelerator), on_complete=release_vae)

    @staticmethod
    def verify_text_encoder_caching(groups: list) -> None:
        """Refuse datasets whose captions vary (DatasetError naming the subset) or that cannot cache."""
        for group in groups:
            if not hasattr(group, "cache_text_encoder_outputs"):
                raise ArgumentError(f"--cache_text_encoder_outputs: {type(group).__name__} (--dataset_class) does "
                                    "not support caching text encoder outputs; drop the flag")
            group.verify_text_encoder_outputs_cacheable()

    def cache_text_encoder_outputs(self, args, models: FamilyModels, tokenize, groups: list, accelerator,
                                   weight_dtype: torch.dtype) -> None:
        """Encode every caption once (in the dtype training would encode in), then move the text
        encoders off the device: with the outputs cached they are needed again only for sample images."""
        from library.data import te_cache

        for te in models.text_encoders:
            _place(te, accelerator.device, weight_dtype)

        def encode(captions: list[str]) -> dict[str, torch.Tensor]:
            batch = {"captions": captions}
            if tokenize is not None:
                batch["input_ids"] = tokenize(captions)
            with torch.no_grad(), accelerator.autocast():
                return self.family.text_encoder_outputs_to_cache(self.family.encode_text(models, batch, args))

        to_disk = bool(getattr(args, "cache_text_encoder_outputs_to_disk", False))
        options = dict(batch_size=getattr(args, "text_encoder_batch_size", None) or args.train_batch_size,
                       to_disk=to_disk, skip_cache_check=args.skip_cache_check,
                       suffix=self.family.text_encoder_cache_suffix, expected_shapes=te_cache.probe_shapes(encode),
                       settings=self.family.text_encoder_cache_settings(args))
        for group in groups:
            if to_disk and accelerator.num_processes > 1:  # each process writes its share of the files
                group.cache_text_encoder_outputs(encode, process_index=accelerator.process_index,
                                                 num_processes=accelerator.num_processes, **options)
                accelerator.wait_for_everyone()
            encoded = group.cache_text_encoder_outputs(encode, **options)
            logger.info("text encoder outputs cached (%s): %d caption(s) encoded now",
                        "on disk" if to_disk else "in memory", encoded)
        for te in models.text_encoders:
            te.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def prepare_models_for_training(self, args, models: FamilyModels, accelerator, weight_dtype) -> None:
        """Frozen base models on the device in their dtype; checkpointing where asked; then the
        target makes what it trains trainable."""
        target = self.target
        train_te = target.train_text_encoder
        for model in [models.denoiser, *models.text_encoders]:
            model.requires_grad_(False)
        models.vae.requires_grad_(False)
        models.vae.eval()
        trained_dtype = target.trained_dtype(weight_dtype, args)
        # Cast (and store in fp8) on the CPU before moving: the full-precision denoiser may not fit the
        # device, and with --blocks_to_swap part of it never moves there.
        _place(models.denoiser, "cpu", trained_dtype if target.trains_base_weights else weight_dtype)
        fp8 = args.fp8_base or getattr(args, "fp8_base_unet", None)
        if fp8:
            logger.info("--fp8_base: %d denoiser layers store float8 weights", store_in_fp8(models.denoiser))
        self.family.place_denoiser(models, args, accelerator.device)
        te_dtype = trained_dtype if train_te and target.trains_base_weights else weight_dtype
        for te in models.text_encoders:
            # Cached outputs: the encoders wait on the CPU (in the dtype they would run in) for sampling.
            _place(te, "cpu" if caches_text_encoder_outputs(args) else accelerator.device, te_dtype)
        if fp8 and not getattr(args, "fp8_base_unet", None):
            for te, skip in self.family.fp8_text_encoders(models, args):
                logger.info("--fp8_base: %d %s layers store float8 weights", store_in_fp8(te, skip),
                            type(te).__name__)
        if not args.cache_latents:
            _place(models.vae, accelerator.device, torch.float32 if args.no_half_vae else weight_dtype)
        if args.gradient_checkpointing:
            self.family.enable_gradient_checkpointing(models, args, train_te)
        if args.torch_compile:
            # Compiled after the network is applied, so the LoRA forwards are part of the graph. The
            # accelerate-level compile would wrap the network module, whose forward is never called.
            models.denoiser.compile(backend=args.dynamo_backend)
        # Train mode makes checkpointing active; the base models have no dropout that would change.
        models.denoiser.train(args.gradient_checkpointing)
        for te in models.text_encoders:
            te.train(train_te and args.gradient_checkpointing)
        target.prepare_for_training(args, self.family, models)

    def make_schedule(self, args, num_batches: int, num_processes: int) -> Schedule:
        per_epoch = steps_per_epoch(num_batches, args.gradient_accumulation_steps, num_processes)
        if args.max_train_epochs:
            args.max_train_steps = args.max_train_epochs * per_epoch
            logger.info("--max_train_epochs %d -> %d steps", args.max_train_epochs, args.max_train_steps)
        num_epochs = math.ceil(args.max_train_steps / per_epoch)
        return Schedule(steps_per_epoch=per_epoch, max_train_steps=args.max_train_steps, num_epochs=num_epochs)

    def resume_or_start(self, args, accelerator, schedule: Schedule, lr_scheduler) -> None:
        """Set where the run starts: a resumed state, or ``--initial_step/--initial_epoch``."""
        if args.resume:
            self.load_resume_state(args.resume, accelerator)
            _, step = read_train_state(args.resume)
            schedule.first_step = step
            # A resume always continues exactly where the state was written: same batches next.
            schedule.skip_batches = (step % schedule.steps_per_epoch) * args.gradient_accumulation_steps
            logger.info("resumed from %s at step %d (epoch %d)", args.resume, step, schedule.first_epoch + 1)
            return
        if getattr(args, "initial_step", None):
            first = getattr(args, "initial_step", None)
        elif getattr(args, "initial_epoch", None):
            first = (getattr(args, "initial_epoch", None) - 1) * schedule.steps_per_epoch
        else:
            first = 0
        if first:
            if first >= schedule.max_train_steps:
                raise ArgumentError(f"--initial_step/--initial_epoch start at step {first}, past --max_train_steps "
                                    f"{schedule.max_train_steps}")
            schedule.first_step = first
            if getattr(args, "skip_until_initial_step", None):
                schedule.skip_batches = (first % schedule.steps_per_epoch) * args.gradient_accumulation_steps
            for _ in range(first):  # the learning rate continues from the step the run starts at
                lr_scheduler.step()

    def load_resume_state(self, state_dir: str, accelerator) -> None:
        """``accelerator.load_state`` with the ways an optimizer state can fail to fit said in one line:
        another optimizer class (from ``train_state.json``), or other parameter groups."""
        saved = saved_optimizer(state_dir)
        if saved and self.optimizer_class and saved != self.optimizer_class:
            raise ArgumentError(f"--resume {state_dir}: the state was saved with optimizer {saved}, this run uses "
                                f"{self.optimizer_class}: resume with the --optimizer_type of the run that saved it "
                                "(or start a new run from the weights it saved)")
        try:
            accelerator.load_state(state_dir)
        except (ValueError, KeyError) as e:  # torch's Optimizer.load_state_dict on a state that does not fit
            raise ArgumentError(f"--resume {state_dir}: its optimizer state does not fit this run's optimizer "
                                f"({type(e).__name__}: {e}). The parameter groups come from what is trained and "
                                "its learning-rate flags (e.g. --text_encoder_lr 0 drops a group; block lr weights "
                                "and LoRA+ ratios add groups), the optimizer from --optimizer_type: resume with those "
                                "of the run that saved it") from e

    def build_metadata(self, args, group, schedule: Schedule, started_at: float, optimizer_name: str,
                       network_args: dict, accelerator, num_validation_images: int = 0) -> dict[str, str]:
        dataset_md = group.metadata(args, num_processes=accelerator.num_processes,
                                    gradient_accumulation_steps=args.gradient_accumulation_steps)
        training = md.training_metadata(
            args, started_at=started_at, num_train_images=group.num_train_images,
            num_reg_images=group.num_reg_images, num_batches_per_epoch=len(group), num_epochs=schedule.num_epochs,
            optimizer_name=optimizer_name, network_args=network_args, dataset_metadata=dataset_md,
            family_metadata=self.family.metadata(args), num_validation_images=num_validation_images)
        return {**training, **self.family.modelspec(args, started_at)}

    @staticmethod
    def tracker_config(args) -> dict:
        """Arguments safe to send to a tracker: no secrets, no absolute paths (see ``trackers``)."""
        return trackers.sanitized_config(args)

    def make_validator(self, args, accelerator, models: FamilyModels, val_group, schedule: Schedule) -> ValidationRunner:
        """The validation-loss runner over ``val_group`` (fixed batches: epoch 1, warmup done)."""
        from library.data.collate import collate_batch
        from library.sampling.previews import eval_mode

        val_group.set_current_epoch(1)
        val_group.set_max_train_steps(schedule.max_train_steps)
        val_group.set_current_step(schedule.max_train_steps)
        loader = torch.utils.data.DataLoader(val_group, batch_size=1, shuffle=False, num_workers=0,
                                             collate_fn=collate_batch)
        logger.info("validation: %d images in %d batches, timesteps %s", val_group.num_train_images,
                    len(val_group), ValidationSettings.from_args(args).timesteps)
        return ValidationRunner(
            settings=ValidationSettings.from_args(args), batches=lambda: iter(loader),
            batch_losses=family_batch_losses(self.family, models, args, accelerator, loss_config=self.loss_config,
                                             weight_dtype=weight_dtypes(args)[0]),
            eval_context=lambda: eval_mode(models.denoiser, *models.text_encoders, *self.target.modules()))

    # ================================================================================= the loop
    def loop(self, args, accelerator, models: FamilyModels, optimizer, lr_scheduler, dataloader, group,
             schedule: Schedule, policy: SavePolicy, base_metadata, save_dtype, weight_dtype) -> None:
        target = self.target
        log = (lambda values, step: accelerator.log(values, step=step)) if trackers.uses_trackers(args) else None
        losses = LossLog(accelerator.device, window=schedule.steps_per_epoch, log=log)
        max_norm_value = getattr(args, "scale_weight_norms", None)
        max_norms = MaxNormLog(log, flush_every=losses.flush_every) if max_norm_value and log is not None else None
        sampler = self.find_sampler(dataloader)

        global_step = schedule.first_step
        progress = tqdm(total=schedule.max_train_steps, initial=global_step, desc="steps",
                        disable=not accelerator.is_local_main_process, smoothing=0)
        if args.sample_at_first and global_step == 0:
            self.sample(args, accelerator, models, step=0, epoch=None)

        epoch = schedule.first_epoch
        for epoch in range(schedule.first_epoch, schedule.num_epochs):
            group.set_current_epoch(epoch + 1)
            dataloader.set_epoch(epoch)  # accelerate passes it on to the sampler: the order of this epoch
            if epoch == schedule.first_epoch and schedule.skip_batches:
                sampler.skip_next(schedule.skip_batches * accelerator.num_processes)
            target.on_epoch_start(self.family, models)

            for batch in dataloader:
                group.set_current_step(global_step)
                if self.first_use_latents is not None:
                    batch = self.first_use_latents.fill(batch)
                with accelerator.accumulate(*target.modules()):
                    loss = self.training_loss(args, accelerator, models, batch, target.train_text_encoder,
                                              weight_dtype)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm and not self.fused_clipping:
                        accelerator.clip_grad_norm_(target.trainable_parameters(), args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                # Once per optimizer step (not per accumulation micro-batch): max-norm for networks,
                # whose results stay on the device (MaxNormLog reads a block of steps back at once).
                norms = target.after_optimizer_step(args, global_step, accelerator.device)
                if norms is not None and max_norms is not None:
                    max_norms.add(norms, global_step)
                progress.update(1)
                losses.add(loss, global_step)
                if log is not None:
                    log(self.lr_logs(lr_scheduler), global_step)
                if global_step % losses.flush_every == 0:
                    progress.set_postfix(avr_loss=f"{losses.average:.4f}")
                if policy.saves_at_step(global_step):
                    losses.flush()
                    self.save(args, accelerator, policy, policy.step_stem(global_step), base_metadata,
                              save_dtype, epoch=epoch + 1, step=global_step, with_state=policy.save_state)
                    policy.prune_after_step_save(global_step)
                if self.sample_due(args, step=global_step, epoch_end=False):
                    losses.flush()
                    self.sample(args, accelerator, models, step=global_step, epoch=None)
                if self.validator is not None and self.validator.settings.due_at_step(global_step):
                    losses.flush()
                    with optimizer_eval_mode(optimizer):
                        self.validator.run(kind="step", step=global_step, train_loss=losses.average, log=log)
                if self.interrupt is not None and self.interrupt.stop_now(accelerator, global_step):
                    accelerator.end_training()
                    self.stop_on_interrupt(args, accelerator, policy, losses, base_metadata, save_dtype,
                                           epoch=epoch + 1, step=global_step)
                if global_step >= schedule.max_train_steps:
                    break

            epoch_mean = losses.end_epoch()
            if log is not None:
                log({"loss/epoch_average": epoch_mean}, epoch + 1)
            logger.info("epoch %d/%d done, mean loss %.4f", epoch + 1, schedule.num_epochs, epoch_mean)
            if self.validator is not None and self.validator.settings.due_at_epoch_end(epoch + 1):
                with optimizer_eval_mode(optimizer):
                    self.validator.run(kind="epoch", step=epoch + 1, train_loss=epoch_mean, log=log)
            if policy.saves_at_epoch_end(epoch + 1, schedule.num_epochs):
                self.save(args, accelerator, policy, policy.epoch_stem(epoch + 1), base_metadata,
                          save_dtype, epoch=epoch + 1, step=global_step, with_state=policy.save_state)
                policy.prune_after_epoch_save(epoch + 1)
            if self.sample_due(args, step=global_step, epoch_end=True, epoch=epoch + 1):
                self.sample(args, accelerator, models, step=global_step, epoch=epoch + 1)
            if global_step >= schedule.max_train_steps:
                break

        progress.close()
        losses.flush()
        if max_norms is not None:
            max_norms.flush()
        self.save(args, accelerator, policy, policy.final_stem(), base_metadata, save_dtype,
                  epoch=epoch + 1, step=global_step,
                  with_state=policy.save_state or policy.save_state_on_train_end)
        accelerator.end_training()
        logger.info("training finished: %s", policy.model_path(policy.final_stem()))

    def stop_on_interrupt(self, args, accelerator, policy: SavePolicy, losses: LossLog, base_metadata, save_dtype, *,
                          epoch: int, step: int) -> None:
        """Ctrl-C/SIGTERM reached a step boundary: save model and state when asked, then raise
        :class:`TrainingInterrupted` (the entry script exits with status 130 and this message)."""
        losses.flush()  # a NaN found now still stops without saving
        if not (policy.save_state or getattr(args, "save_state_on_interrupt", False)):
            raise TrainingInterrupted(f"interrupted at step {step}; nothing saved (--save_state or "
                                      "--save_state_on_interrupt keep a state to --resume from)")
        stem = policy.step_stem(step)
        if not (policy.saves_at_step(step) and policy.save_state):  # else this step's save already holds it
            self.save(args, accelerator, policy, stem, base_metadata, save_dtype, epoch=epoch, step=step,
                      with_state=True)
        raise TrainingInterrupted(f"interrupted at step {step}; saved {policy.model_path(stem)} and the state "
                                  f"{policy.state_dir(stem)}; continue with --resume {policy.state_dir(stem)}")

    @staticmethod
    def find_sampler(dataloader) -> EpochShuffleSampler:
        """Our sampler inside accelerate's wrappers (batch sampler, shard) of the DataLoader."""
        frontier = [dataloader]
        for _ in range(4):  # DataLoader -> (shard) batch sampler -> batch sampler -> sampler
            for node in frontier:
                if isinstance(node, EpochShuffleSampler):
                    return node
            frontier = [child for node in frontier for child in
                        (getattr(node, "batch_sampler", None), getattr(node, "sampler", None)) if child is not None]
        raise RuntimeError("could not find the epoch sampler inside the prepared DataLoader")

    def training_loss(self, args, accelerator, models: FamilyModels, batch: dict, train_te: bool,
                      weight_dtype) -> torch.Tensor:
        """Loss of one batch: latents, text conditioning, prediction, then :func:`library.training.loss.training_loss`
        (``--loss_type``, alpha masks, prior loss weights, SNR weightings)."""
        with torch.no_grad():
            if batch.get("latents") is not None:
                latents = batch["latents"].to(accelerator.device)
            else:
                latents = self.family.encode_images(models, batch["images"].to(accelerator.device))
            latents = torch.nan_to_num(latents.float())
        with accelerator.autocast():
            if batch.get("text_encoder_outputs") is not None:
                conditioning = self.family.conditioning_from_cache(models, batch["text_encoder_outputs"], args,
                                                                   accelerator.device, weight_dtype)
            else:
                with torch.set_grad_enabled(train_te):
                    conditioning = self.family.encode_text(models, batch, args)
            prediction = self.family.predict(models, latents, conditioning, batch, args)
        return prediction_loss(prediction, self.loss_config, loss_weights=batch["loss_weights"],
                               masks=batch.get("alpha_masks"))

    def lr_logs(self, lr_scheduler) -> dict:
        return lr_log_values(self.optimizer, lr_scheduler, self.lr_names)

    # ========================================================================= save and sample
    def save(self, args, accelerator, policy: SavePolicy, stem: str, base_metadata, save_dtype, *,
             epoch: int, step: int, with_state: bool) -> None:
        accelerator.wait_for_everyone()
        with optimizer_eval_mode(self.optimizer):  # schedule-free: save the averaged weights
            if accelerator.is_main_process:
                path = policy.model_path(stem)
                metadata = md.save_time_metadata(base_metadata, epoch=epoch, step=step, no_metadata=getattr(args, "no_metadata", None))
                self.target.save(path, save_dtype, metadata, epoch=epoch, step=step)
                logger.info("saved %s", path)
            if with_state:
                self.save_state(accelerator, policy.state_dir(stem), epoch=epoch, step=step)

    def save_state(self, accelerator, state_dir: Path, *, epoch: int, step: int) -> None:
        """Write the state into a temporary folder and rename it, so a kill never leaves half a state."""
        tmp = state_dir.with_name(state_dir.name + ".tmp")
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            write_train_state(tmp, epoch=epoch, step=step, optimizer=self.optimizer_class)
            # Moved aside, not deleted, until the new state is in place: a kill in between leaves
            # `<name>-state.old`, still a complete state to resume from.
            old = state_dir.with_name(state_dir.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            if state_dir.exists():
                os.replace(state_dir, old)
            os.replace(tmp, state_dir)
            if old.exists():
                shutil.rmtree(old)
            logger.info("saved state %s", state_dir)

    @staticmethod
    def sample_due(args, *, step: int, epoch_end: bool, epoch: int | None = None) -> bool:
        if not args.sample_prompts:
            return False
        if epoch_end:
            return bool(args.sample_every_n_epochs) and epoch % args.sample_every_n_epochs == 0
        if args.sample_every_n_epochs:  # the epoch setting wins over the step setting
            return False
        return bool(args.sample_every_n_steps) and step % args.sample_every_n_steps == 0

    def sample(self, args, accelerator, models: FamilyModels, *, step: int, epoch: int | None) -> None:
        from library.sampling.previews import eval_mode, write_sample_images
        from library.sampling.prompts import load_prompts

        prompts = [dataclasses.replace(p, prompt=self.target.prompt_text(p.prompt),
                                       negative_prompt=self.target.prompt_text(p.negative_prompt))
                   for p in load_prompts(args.sample_prompts, defaults=self.family.sample_defaults(args))]
        device = accelerator.device
        cached_te = caches_text_encoder_outputs(args)
        models.vae.to(device)
        if cached_te:  # the text encoders wait on the CPU while their outputs are cached
            for te in models.text_encoders:
                te.to(device)
        try:
            generate = lambda prompt, generator: self.family.sample_image(  # noqa: E731
                models, prompt, generator, args, device, torch.float32)
            with optimizer_eval_mode(self.optimizer):
                write_sample_images(prompts, generate, output_dir=args.output_dir, output_name=args.output_name,
                                    step=step, epoch=epoch, device=device,
                                    eval_context=eval_mode(models.denoiser, *models.text_encoders,
                                                           *self.target.modules()),
                                    process_index=accelerator.process_index, num_processes=accelerator.num_processes)
        finally:
            if args.cache_latents:
                models.vae.to("cpu")
            if cached_te:
                for te in models.text_encoders:
                    te.to("cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


class NetworkTrainer(Trainer):
    """The trainer of ``train_network.py`` and the other ``*_train_network.py`` scripts."""

    def __init__(self, family: ModelFamily):
        super().__init__(family, NetworkTarget())
