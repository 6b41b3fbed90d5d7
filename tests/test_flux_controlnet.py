"""The FLUX ControlNet (the reference's ControlNetFlux layout) and flux_train_control_net.py end to end.

The run trains a ControlNet on shapes whose conditioning image is the image itself. Measured with fixed
noise and timesteps: the denoising loss with the trained ControlNet against the base DiT (a new
ControlNet adds exactly zero), and generation: latents drawn with the ControlNet and a conditioning
image are closer to that image's latents than latents drawn without it (distances in the AE's latent
space: the tiny AE has random weights and does not reconstruct pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from library.demo.shapes import shape_image
from library.demo.tiny_flux import random_flux_state_dict, tiny_flux_config
from library.families.flux.controlnet import ControlNetFlux, ControlNetFluxConfig, load_flux_controlnet, residual_kwargs
from library.families.flux.model import Flux, image_ids, pack_latents, text_ids
from library.families.sd.checkpoint.common import CheckpointError
from tests.train_helpers import base_train_args, read_metadata, run_script

torch.set_num_threads(1)

SCRIPT = "flux_train_control_net.py"
CAPTION = "a shape"
PICTURES = [("square", "red", "blue"), ("circle", "yellow", "black")]
TIMESTEPS = (100, 300, 500, 700, 900)


def _flux(guidance_embed: bool = True) -> Flux:
    model = Flux(tiny_flux_config(guidance_embed))
    model.load_state_dict(random_flux_state_dict(tiny_flux_config(guidance_embed), seed=2))
    return model.eval()


def _inputs(flux: Flux, batch: int = 2, size: int = 8, n_txt: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = flux.config
    return dict(img=pack_latents(torch.randn(batch, 16, size, size, generator=g)), img_ids=image_ids(batch, size, size),
                txt=torch.randn(batch, n_txt, cfg.context_in_dim, generator=g), txt_ids=text_ids(batch, n_txt),
                timesteps=torch.rand(batch, generator=g), y=torch.randn(batch, cfg.vec_in_dim, generator=g),
                guidance=torch.full((batch,), 3.5) if cfg.guidance_embed else None)


def _randomise_projections(controlnet: ControlNetFlux, seed: int = 0) -> None:
    """Trained-looking (non-zero) output projections and last hint convolution."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith("controlnet_blocks"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.startswith("input_hint_block.14"):
                p.copy_(torch.randn(p.shape, generator=g))


# -- the model -------------------------------------------------------------------------------------------


def test_layout_is_the_reference_controlnet():
    flux = _flux()
    controlnet = ControlNetFlux.from_flux(flux, depth=2, single_depth=1)
    keys = controlnet.state_dict().keys()
    roots = {k.split(".")[0] for k in keys}
    assert roots == {"img_in", "time_in", "vector_in", "guidance_in", "txt_in", "double_blocks", "single_blocks",
                     "controlnet_blocks", "controlnet_blocks_for_single", "pos_embed_input", "input_hint_block"}
    assert {k for k in keys if k.startswith("input_hint_block.")} == {
        f"input_hint_block.{i}.{p}" for i in range(0, 16, 2) for p in ("weight", "bias")}
    assert {k.split(".")[1] for k in keys if k.startswith(("double_blocks.", "controlnet_blocks."))} == {"0", "1"}
    assert "double_blocks.0.img_mod.lin.weight" in keys and "single_blocks.0.linear1.weight" in keys
    # the DiT's embedders and first blocks are copied; the projections and the last hint conv are zero
    flux_sd = flux.state_dict()
    for key, value in controlnet.state_dict().items():
        if key in flux_sd:
            assert torch.equal(value, flux_sd[key]), key
        if key.startswith(("controlnet_blocks", "input_hint_block.14")):
            assert not value.any(), key
    assert "guidance_in.in_layer.weight" not in ControlNetFlux.from_flux(_flux(guidance_embed=False)).state_dict()


def test_a_new_controlnet_changes_nothing_and_a_trained_one_does():
    flux = _flux()
    controlnet = ControlNetFlux.from_flux(flux, depth=2, single_depth=1).eval()
    x = _inputs(flux)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = flux(**x)
        residuals = residual_kwargs(controlnet, x["img"], x["img_ids"], hint, x["txt"], x["txt_ids"], x["timesteps"],
                                    x["y"], x["guidance"], None)
        assert [r.shape for r in residuals["block_controlnet_hidden_states"]] == [(2, 16, 64)] * 2
        assert [r.shape for r in residuals["block_controlnet_single_hidden_states"]] == [(2, 16, 64)]
        assert torch.equal(flux(**x, **residuals), plain)

        _randomise_projections(controlnet)
        residuals = residual_kwargs(controlnet, x["img"], x["img_ids"], hint, x["txt"], x["txt_ids"], x["timesteps"],
                                    x["y"], x["guidance"], None)
        controlled = flux(**x, **residuals)
        assert (controlled - plain).abs().max() > 1e-2
        other_hint = residual_kwargs(controlnet, x["img"], x["img_ids"], 1 - hint, x["txt"], x["txt_ids"],
                                     x["timesteps"], x["y"], x["guidance"], None)
        assert (flux(**x, **other_hint) - controlled).abs().max() > 1e-3  # the image matters
        only_single = dict(residuals, block_controlnet_hidden_states=[])
        assert (flux(**x, **only_single) - plain).abs().max() > 1e-3  # the single-block residual is used too


def test_controlnet_file_round_trip_and_bad_files(tmp_path, tiny_flux):
    flux = _flux()
    controlnet = ControlNetFlux.from_flux(flux, depth=1, single_depth=2)
    _randomise_projections(controlnet)
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(path))
    loaded = load_flux_controlnet(path, flux)
    assert loaded.config == ControlNetFluxConfig(flux.config, depth=1, single_depth=2)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in controlnet.state_dict().items())
    with pytest.raises(CheckpointError, match="not a FLUX ControlNet file"):
        load_flux_controlnet(tiny_flux.dit, flux)
    schnell = tmp_path / "schnell_cn.safetensors"
    save_file(ControlNetFlux.from_flux(_flux(guidance_embed=False)).state_dict(), str(schnell))
    with pytest.raises(CheckpointError, match="lacks .*guidance_in"):
        load_flux_controlnet(schnell, flux)  # a schnell ControlNet for a dev DiT


# -- training end to end -----------------------------------------------------------------------------------


def write_dataset(root: Path) -> tuple[Path, Path]:
    images, cond = root / "images", root / "cond"
    images.mkdir(parents=True)
    cond.mkdir(parents=True)
    for i, picture in enumerate(PICTURES):
        image = shape_image(*picture)
        image.save(images / f"{i}.png")
        image.save(cond / f"{i}.png")
        (images / f"{i}.txt").write_text(CAPTION, encoding="utf-8")
    return images, cond


def cn_args(files, out: Path, images: Path, cond: Path, **overrides) -> list[str]:
    values = dict(network_module=None, network_dim=None, network_alpha=None, train_data_dir=images,
                  conditioning_data_dir=cond, caption_extension=".txt", learning_rate=3e-3, cache_latents=True,
                  output_name="cn", train_batch_size=2, max_train_steps=50, t5xxl_max_token_length=16,
                  guidance_scale=1.0, model_prediction_type="raw", pretrained_model_name_or_path=None)
    values.update(overrides)
    return files.train_args() + base_train_args(files.dit, out, **values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    return write_dataset(tmp_path_factory.mktemp("flux_cn_data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_flux, dataset):
    root = tmp_path_factory.mktemp("flux_cn_run")
    prompts = root / "prompts.txt"
    prompts.write_text(f"{CAPTION} --w 64 --h 64 --s 3 --d 7 --cn {dataset[1] / '0.png'}\n")
    out = root / "out"
    run_script(SCRIPT, cn_args(tiny_flux, out, *dataset, controlnet_single_depth=1, sample_prompts=prompts,
                               sample_every_n_steps=50))
    return out


class Probe:
    """The tiny DiT, the shapes' latents, the caption's conditioning: loss and generation with or without a
    ControlNet."""

    def __init__(self, files):
        from library.args import setup_flux_network_parser
        from library.families.flux.family import FluxFamily

        self.family = FluxFamily()
        self.args = setup_flux_network_parser().parse_args(
            files.train_args() + ["--t5xxl_max_token_length", "16", "--model_prediction_type", "raw",
                                  "--guidance_scale", "1.0"])
        self.family.validate_args(self.args)
        self.models = self.family.load_models(self.args, torch.device("cpu"), torch.float32)
        arrays = [np.asarray(shape_image(*p), dtype=np.float32) / 255 for p in PICTURES]
        self.control = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        with torch.no_grad():
            self.latents = self.family.encode_images(self.models, self.control * 2 - 1)
            ids = self.family.make_tokenize_fn(self.models, self.args)([CAPTION] * len(PICTURES))
            self.conditioning = self.family.encode_text(self.models, {"input_ids": ids}, self.args)

    def use(self, controlnet) -> None:
        from library.families.flux.controlnet_target import FluxControl

        self.models.extra.pop("flux_control", None)
        if controlnet is not None:
            self.models.extra["flux_control"] = FluxControl(controlnet.eval())

    @torch.no_grad()
    def loss(self, controlnet) -> float:
        from library.demo.evaluate import family_denoising_loss

        self.use(controlnet)
        return family_denoising_loss(self.family, self.models, self.args, self.latents, self.conditioning,
                                     batch={"conditioning_images": self.control}, timesteps=TIMESTEPS)

    @torch.no_grad()
    def generation_distance(self, controlnet, index: int, seed: int) -> float:
        """Mean squared distance of latents drawn (FLUX schedule, 8 Euler steps) with conditioning image
        ``index`` to that image's latents."""
        from library.families.flux.generation import FluxSampler
        from library.sampling.flow import flux_schedule, sample_flow

        clip_l, t5 = self.models.text_encoders
        sampler = FluxSampler(self.models.denoiser, self.models.vae, clip_l, t5, *self.models.tokenizers,
                              t5_max_length=16, controlnet=controlnet,
                              control_image=self.control[index:index + 1] if controlnet is not None else None)
        cond = sampler.encode([CAPTION], torch.device("cpu"), torch.float32)
        noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(seed))
        latents = sample_flow(lambda x, sigma: sampler.velocity(x, sigma, cond, 1.0, torch.float32), noise,
                              flux_schedule(8, 16, shift=True), progress=False)
        return (latents - self.latents[index:index + 1]).pow(2).mean().item()


def test_trained_controlnet_lowers_the_loss_and_steers_generation(trained, tiny_flux):
    probe = Probe(tiny_flux)
    base = probe.loss(None)
    new = ControlNetFlux.from_flux(probe.models.denoiser, 2, 1)
    assert probe.loss(new) == pytest.approx(base, abs=1e-6)  # zero-initialised: no effect
    controlnet = load_flux_controlnet(trained / "cn.safetensors", probe.models.denoiser)
    assert probe.loss(controlnet) < 0.9 * base
    probe.use(None)
    for index in range(len(PICTURES)):
        without = np.mean([probe.generation_distance(None, index, seed) for seed in (1, 2)])
        with_cn = np.mean([probe.generation_distance(controlnet, index, seed) for seed in (1, 2)])
        assert with_cn < 0.8 * without, (index, with_cn, without)


def test_saved_file_layout_metadata_and_preview(trained, tiny_flux):
    saved = load_file(str(trained / "cn.safetensors"))
    flux = Flux(tiny_flux_config())
    expected = ControlNetFlux(ControlNetFluxConfig(flux.config, depth=2, single_depth=1)).state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert saved["controlnet_blocks.0.weight"].abs().sum() > 0  # trained away from zero
    md = read_metadata(trained / "cn.safetensors")
    assert md["modelspec.architecture"] == "flux-1-dev/controlnet"
    assert md["ss_base_model_version"] == "flux1"
    assert not any(k.startswith("ss_network_") for k in md)
    samples = list((trained / "sample").glob("cn_000050_00_*_7.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_training_continues_from_a_controlnet_file(tmp_path, trained, tiny_flux, dataset):
    out = tmp_path / "more"
    # depths come from the file: --controlnet_single_depth 0 (the default) does not drop its single block
    run_script(SCRIPT, cn_args(tiny_flux, out, *dataset, max_train_steps=2,
                               controlnet_model_name_or_path=trained / "cn.safetensors"))
    before, after = load_file(str(trained / "cn.safetensors")), load_file(str(out / "cn.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    changed = (after["controlnet_blocks.0.weight"] - before["controlnet_blocks.0.weight"]).abs().max()
    assert 0 < changed < before["controlnet_blocks.0.weight"].abs().max()  # continued, not restarted


@pytest.mark.parametrize("extra, message", [
    (["--conditioning_data_dir", "/nonexistent"], "--conditioning_data_dir /nonexistent: no such folder"),
    (["--controlnet_depth", "0"], "needs at least one block"),
    (["--controlnet_model_name_or_path", "/nope.safetensors"], "no such file"),
    (["--model_type", "chroma"], "trains --model_type flux only"),
])
def test_bad_flags_are_refused_before_loading(tmp_path, tiny_flux, dataset, extra, message):
    import flux_train_control_net

    argv = cn_args(tiny_flux, tmp_path / "out", *dataset) + extra
    with pytest.raises(SystemExit) as info:
        flux_train_control_net.main(argv)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_lora_training_refuses_a_controlnet(tmp_path, tiny_flux, dataset):
    import flux_train_network

    argv = tiny_flux.train_args() + base_train_args(
        tiny_flux.dit, tmp_path / "out", pretrained_model_name_or_path=None, train_data_dir=dataset[0].parent,
        network_module="networks.lora_flux", controlnet_model_name_or_path=tmp_path / "cn.safetensors")
    with pytest.raises(SystemExit, match="flux_train_control_net.py"):
        flux_train_network.main(argv)
