"""train_control_net.py and sdxl_train_control_net.py end to end on tiny models, as users run them.

Each run trains a ControlNet on shapes whose conditioning image is the image itself. Measured with
fixed noise and timesteps: the denoising loss with the trained ControlNet against the base U-Net (a new
ControlNet adds exactly zero), and generation: latents drawn with the ControlNet are much closer to the
conditioning image's latents than those drawn without it. (Distances are taken in the VAE latent space:
the tiny VAE has random weights and does not reconstruct pixels.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.demo.shapes import shape_image
from tests.train_helpers import base_train_args, run_script, tensorboard_events

TIMESTEPS = (100, 300, 500, 700, 900)
CAPTION = "a shape"
PICTURES = [("square", "red", "blue"), ("circle", "yellow", "black")]


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


def cn_args(model: Path, out: Path, images: Path, cond: Path, **overrides) -> list[str]:
    values = dict(network_module=None, network_dim=None, network_alpha=None, train_data_dir=images,
                  conditioning_data_dir=cond, caption_extension=".txt", learning_rate=6e-3, cache_latents=True,
                  output_name="cn", train_batch_size=2, max_train_steps=30)
    values.update(overrides)
    return base_train_args(model, out, **values)


def pixels() -> torch.Tensor:
    arrays = [np.asarray(shape_image(*p), dtype=np.float32) / 255 for p in PICTURES]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class Probe:
    """A base model's U-Net, latents of the shapes and the caption's conditioning: denoising loss and
    generation with or without a ControlNet."""

    def __init__(self, unet, latents, context, added=None):
        self.unet, self.latents, self.context, self.added = unet, latents, context, added
        self.control = pixels()

    def residuals(self, controlnet, x, t, context, added, image):
        from library.controlnet.control import controlnet_residuals

        return {} if controlnet is None else controlnet_residuals(controlnet, x, t, context, image,
                                                                  added_cond_kwargs=added)

    @torch.no_grad()
    def loss(self, controlnet) -> float:
        from library.families.ddpm import DDPMObjective

        objective, generator, total = DDPMObjective(False), torch.Generator().manual_seed(0), 0.0
        n = self.latents.shape[0]
        for t in TIMESTEPS:
            noise = torch.randn(self.latents.shape, generator=generator)
            ts = torch.full((n,), t, dtype=torch.long)
            noisy, target = objective.noisy_latents_and_target(self.latents, noise, ts)
            kw = {"added_cond_kwargs": self.added} if self.added else {}
            kw.update(self.residuals(controlnet, noisy, ts, self.context, self.added, self.control))
            total += torch.nn.functional.mse_loss(self.unet(noisy, ts, self.context, **kw).sample, target).item()
        return total / len(TIMESTEPS)

    @torch.no_grad()
    def generation_distance(self, controlnet, index: int, seed: int) -> float:
        """Mean squared distance of latents drawn (DDIM, 20 steps) with the conditioning image ``index``
        to that image's latents."""
        from library.sampling.pipeline import sample_latents
        from library.sampling.schedulers import make_scheduler

        context = self.context[index:index + 1]
        added = {k: v[index:index + 1] for k, v in self.added.items()} if self.added else None

        def model(x, t, c):
            kw = {"added_cond_kwargs": added} if added else {}
            kw.update(self.residuals(controlnet, x, t, c, added, self.control[index:index + 1]))
            return self.unet(x, t, c, **kw).sample

        latents = sample_latents(model, make_scheduler("ddim", v_parameterization=False), shape=(1, 4, 8, 8),
                                 steps=20, cond=context, uncond=None, guidance_scale=1.0,
                                 generator=torch.Generator().manual_seed(seed), device="cpu", dtype=torch.float32,
                                 progress=False)
        return (latents - self.latents[index:index + 1]).pow(2).mean().item()


def sd_probe(model: Path) -> Probe:
    from library.families.sd import text
    from library.families.sd.family import LATENT_SCALE
    from library.families.sd.loading import load_sd_models

    sd = load_sd_models(str(model), v2=False)
    with torch.no_grad():
        latents = sd.vae.encode(pixels() * 2 - 1).latent_dist.mean * LATENT_SCALE
        context = text.encode(sd.text_encoder, text.tokenize(sd.tokenizer, [CAPTION] * len(PICTURES), None),
                              clip_skip=None, max_token_length=None)
    return Probe(sd.unet, latents, context)


def sdxl_probe(model: Path) -> Probe:
    from library.families.sdxl import text
    from library.families.sdxl.generation import SDXL_LATENT_SCALE
    from library.families.sdxl.loading import load_sdxl_models

    m = load_sdxl_models(str(model))
    n = len(PICTURES)
    with torch.no_grad():
        latents = m.vae.encode(pixels() * 2 - 1).latent_dist.mean * SDXL_LATENT_SCALE
        ids = text.tokenize(m.tokenizer1, m.tokenizer2, [CAPTION] * n, None)
        cond = text.encode(m.text_encoder1, m.text_encoder2, ids, m.tokenizer2.eos_token_id)
    sizes = torch.tensor([[64, 64]] * n)
    added = {"text_embeds": cond.pooled, "time_ids": text.size_ids(sizes, torch.zeros(n, 2, dtype=torch.long),
                                                                 sizes).float()}
    return Probe(m.unet, latents, cond.context, added)


def assert_reloads_identically(saved: Path, unet):
    """The file is diffusers' ControlNetModel state dict: it loads strictly into the model diffusers builds
    from the U-Net (and through our loader), tensor for tensor."""
    from diffusers import ControlNetModel

    from library.controlnet.loading import load_controlnet

    tensors = load_file(str(saved))
    theirs = ControlNetModel.from_unet(unet)
    theirs.load_state_dict(tensors, strict=True)
    ours = load_controlnet(saved, unet)
    for key, value in tensors.items():
        assert torch.equal(theirs.state_dict()[key], value) and torch.equal(ours.state_dict()[key], value), key
    return ours


def assert_controlnet_learned(probe: Probe, controlnet):
    from library.controlnet.loading import controlnet_from_unet

    before, new, after = probe.loss(None), probe.loss(controlnet_from_unet(probe.unet)), probe.loss(controlnet)
    assert new == pytest.approx(before, abs=1e-6)  # a new ControlNet adds nothing
    assert after < 0.7 * before, (before, after)  # measured: 0.46 (SD1), 0.54 (SDXL)
    for index in range(len(PICTURES)):
        free, controlled = probe.generation_distance(None, index, 1), probe.generation_distance(controlnet, index, 1)
        assert controlled < 0.6 * free, (index, free, controlled)  # measured: 0.43 (SD1), 0.38-0.40 (SDXL)
    return before, after


def write_prompts(root: Path, cond: Path) -> Path:
    prompts = root / "prompts.txt"
    prompts.write_text(f"{CAPTION} --w 64 --h 64 --s 4 --d 5 --l 1 --cn {cond / '0.png'}\n"
                       f"{CAPTION} --w 64 --h 64 --s 4 --d 5 --l 1\n")
    return prompts


# ----------------------------------------------------------------------------------------- SD 1.x


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, tiny_sd1_ckpt):
    root = tmp_path_factory.mktemp("cn_sd1")
    images, cond = write_dataset(root)
    out = root / "out"
    run_script("train_control_net.py", cn_args(tiny_sd1_ckpt, out, images, cond, save_every_n_steps=15,
                                               save_state=True, sample_prompts=write_prompts(root, cond),
                                               sample_every_n_steps=30, logging_dir=root / "logs"))
    return root, out, images, cond


@pytest.mark.slow
def test_sd_controlnet_lowers_the_loss_and_steers_generation(sd_run, tiny_sd1_ckpt):
    _, out, _, _ = sd_run
    probe = sd_probe(tiny_sd1_ckpt)
    controlnet = assert_reloads_identically(out / "cn.safetensors", probe.unet)
    assert_controlnet_learned(probe, controlnet)


def test_sd_controlnet_file_metadata_names_and_previews(sd_run):
    root, out, _, _ = sd_run
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == [
        "cn-step00000015.safetensors", "cn-step00000030.safetensors", "cn.safetensors"]
    assert (out / "cn-step00000015-state").is_dir()
    with safe_open(str(out / "cn.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
    assert md["ss_steps"] == "30" and md["ss_learning_rate"] == "0.006"
    assert not any(k.startswith("ss_network_") for k in md)
    events = tensorboard_events(root / "logs")
    assert "lr/controlnet" in events.Tags()["scalars"]
    assert any(p.is_dir() and p.name == "controlnet_train" for p in (root / "logs").rglob("*"))  # the tracker name
    samples = sorted((out / "sample").glob("*.png"))
    assert len(samples) == 2
    controlled, free = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in samples)
    assert np.abs(controlled - free).mean() > 0.5  # same seed and prompt: only the ControlNet differs


def test_sd_resume_continues_bit_identically_and_saves_a_diffusers_folder(sd_run, tiny_sd1_ckpt, tmp_path):
    from diffusers import ControlNetModel

    _, out, images, cond = sd_run
    resumed = tmp_path / "resumed"
    run_script("train_control_net.py", cn_args(tiny_sd1_ckpt, resumed, images, cond,
                                               resume=out / "cn-step00000015-state", save_model_as="diffusers"))
    folder = resumed / "cn"
    assert (folder / "config.json").is_file()
    theirs = ControlNetModel.from_pretrained(str(folder), local_files_only=True)
    uninterrupted = load_file(str(out / "cn.safetensors"))
    assert theirs.state_dict().keys() == uninterrupted.keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key


def test_training_continues_from_an_original_layout_controlnet(sd_run, tiny_sd1_ckpt, tmp_path):
    from library.controlnet.loading import load_controlnet
    from tests.test_controlnet_loading import to_original

    _, out, images, cond = sd_run
    probe = sd_probe(tiny_sd1_ckpt)
    trained = load_controlnet(out / "cn.safetensors", probe.unet)
    torch.save(to_original(trained, probe.unet), tmp_path / "control_tiny.pth")
    run_script("train_control_net.py", cn_args(tiny_sd1_ckpt, tmp_path / "more", images, cond, max_train_steps=1,
                                               learning_rate=1e-9, controlnet_model_name_or_path=tmp_path /
                                               "control_tiny.pth", save_precision="float"))
    continued = load_file(str(tmp_path / "more" / "cn.safetensors"))
    before = trained.state_dict()
    assert max((continued[k] - before[k]).abs().max().item() for k in before) < 1e-5  # started from the file


def test_bad_inputs_stop_with_one_line(tiny_sd1_ckpt, tmp_path):
    root = tmp_path
    images, cond = write_dataset(root)
    (cond / "1.png").unlink()
    proc = run_script("train_control_net.py", cn_args(tiny_sd1_ckpt, root / "out", images, cond), expect_ok=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "1.png" in last and "conditioning image" in last
    proc = run_script("train_control_net.py", cn_args(tiny_sd1_ckpt, root / "out", images, None), expect_ok=False)
    assert "--conditioning_data_dir is required" in proc.stderr
    bogus = root / "bogus.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(bogus))
    Image.open(images / "1.png").save(cond / "1.png")
    proc = run_script("train_control_net.py", cn_args(tiny_sd1_ckpt, root / "out", images, cond,
                                                      controlnet_model_name_or_path=bogus), expect_ok=False)
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "not a ControlNet" in proc.stderr
    assert not (root / "out" / "cn.safetensors").exists()


# ------------------------------------------------------------------------------------------- SDXL


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_sdxl_ckpt):
    root = tmp_path_factory.mktemp("cn_sdxl")
    images, cond = write_dataset(root)
    out = root / "out"
    run_script("sdxl_train_control_net.py",
               cn_args(tiny_sdxl_ckpt, out, images, cond, bucket_reso_steps=32, control_net_lr=6e-3,
                       learning_rate=3e-3, logging_dir=root / "logs", sample_prompts=write_prompts(root, cond),
                       sample_every_n_steps=30))
    return root, out


@pytest.mark.slow
def test_sdxl_controlnet_lowers_the_loss_and_steers_generation(sdxl_run, tiny_sdxl_ckpt):
    _, out = sdxl_run
    probe = sdxl_probe(tiny_sdxl_ckpt)
    controlnet = assert_reloads_identically(out / "cn.safetensors", probe.unet)
    assert_controlnet_learned(probe, controlnet)


def test_sdxl_control_net_lr_drives_the_controlnet_layers(sdxl_run):
    root, out = sdxl_run
    events = tensorboard_events(root / "logs")
    assert events.Scalars("lr/controlnet")[-1].value == pytest.approx(6e-3)
    assert events.Scalars("lr/controlnet_unet")[-1].value == pytest.approx(3e-3)
    with safe_open(str(out / "cn.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/controlnet"
    assert any(p.is_dir() and p.name == "sdxl_control_net_train" for p in (root / "logs").rglob("*"))
    assert len(list((out / "sample").glob("*.png"))) == 2
