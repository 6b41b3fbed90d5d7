"""Bad input to the trainers: one line naming the file or flag and the fix, a non-zero exit, found
before the long work (model loading, caching, training), and nothing written.

The scripts run in-process through their ``main(argv)``. Problems with the data must be found before
any model loads: those tests make ``load_models`` fail the test if it is reached. The LoRA/model
tools are in ``test_bad_input_tools.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fine_tune
import flux_train_network
import sdxl_train
import train_db
import train_network
from library.demo.shapes import write_shapes_folder
from library.families.flux.family import FluxFamily
from library.families.sd.family import StableDiffusionFamily
from tests.train_helpers import base_train_args


# ------------------------------------------------------------------------------------------ helpers

def fails(main, argv, *, out: Path | None = None) -> str:
    """Run ``main(argv)``; it must exit with a non-zero status. Returns the one-line message."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    code = info.value.code
    assert code not in (0, None), f"exited with status {code!r}"
    message = code if isinstance(code, str) else ""
    assert "\n" not in message and "Traceback" not in message, message
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"files were written: {list(out.iterdir())}"
    return message


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the models are loaded: the problem must be found before."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the models were loaded before the bad input was found")

    monkeypatch.setattr(StableDiffusionFamily, "load_models", refuse)
    monkeypatch.setattr(FluxFamily, "load_models", refuse)


class Records(logging.Handler):
    """The messages of one logger (the trainers replace the root handlers, so caplog would see nothing)."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(name)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


@pytest.fixture
def data(tmp_path) -> Path:
    """A good kohya-style training folder: <data>/2_toy with two captioned images."""
    write_shapes_folder(tmp_path / "data" / "2_toy", 2, seed=1)
    return tmp_path / "data"


def train_args(model, out, data_dir, **overrides) -> list[str]:
    return base_train_args(model, out, train_data_dir=data_dir, caption_extension=".txt", max_train_steps=1,
                           **overrides)


def model_args(model, out, data_dir) -> list[str]:
    """The command line of a full fine-tune (fine_tune.py, train_db.py, sdxl_train.py: no network flags)."""
    return ["--pretrained_model_name_or_path", model, "--output_dir", out, "--train_data_dir", data_dir,
            "--caption_extension", ".txt", "--resolution", "64", "--max_train_steps", "1",
            "--max_data_loader_n_workers", "0", "--console_log_simple"]


def images_folder(tmp_path: Path, name: str = "bad") -> Path:
    """<tmp>/<name>/2_toy with two good images, for a test to add one bad file to."""
    folder = tmp_path / name / "2_toy"
    write_shapes_folder(folder, 2, seed=2)
    return folder


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` pixels and holds none (a decompression-bomb stand-in)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))


def noise_image(path: Path, **save_kwargs) -> None:
    pixels = np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save_kwargs)


def write_lora(path: Path, names: list[str], width: int = 8) -> Path:
    """A LoRA file with modules ``names`` (rank 2); enough to test name checks."""
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.zeros(2, width)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(width, 2)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


SDXL_LORA_NAMES = ["lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                   "lora_te2_text_model_encoder_layers_0_mlp_fc1"]


# ---------------------------------------------------------------------------------------- images

def test_zero_byte_image(tmp_path, tiny_sd1_ckpt, no_model_loading):
    folder = images_folder(tmp_path)
    (folder / "empty.png").write_bytes(b"")
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", folder.parent),
                    out=tmp_path / "out")
    assert message.startswith(f"error: cannot read image {folder / 'empty.png'}: ")
    assert message.endswith("-- replace or remove the file")


def test_file_that_is_not_an_image(tmp_path, tiny_sd1_ckpt, no_model_loading):
    folder = images_folder(tmp_path)
    (folder / "notes.png").write_bytes(b"these are my notes, not a picture\n" * 20)
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", folder.parent),
                    out=tmp_path / "out")
    assert f"cannot read image {folder / 'notes.png'}: cannot identify image file" in message


@pytest.mark.parametrize("name, save, reason", [
    ("cut.png", {}, "image file is truncated"), ("cut.jpg", {"quality": 95}, "image file is truncated"),
    ("cut.webp", {"quality": 90}, "could not create decoder object"),
    ("cut.bmp", {}, "image file is truncated"),
])
def test_truncated_image_is_found_while_the_dataset_is_built(tmp_path, tiny_sd1_ckpt, no_model_loading, name, save,
                                                             reason):
    folder = images_folder(tmp_path)
    noise_image(folder / name, **save)
    whole = (folder / name).read_bytes()
    (folder / name).write_bytes(whole[: len(whole) // 2])  # an interrupted download
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", folder.parent),
                    out=tmp_path / "out")
    assert message.startswith(f"error: cannot decode image {folder / name}: {reason}")
    assert message.endswith("-- replace or remove the file")


@pytest.mark.parametrize("name", ["whole.webp", "whole.bmp"])
def test_whole_webp_and_bmp_pass_the_length_check_without_a_decode(tmp_path, monkeypatch, name):
    from library.data import images

    noise_image(tmp_path / name)
    monkeypatch.setattr(images, "_decode_fully", lambda path: pytest.fail(f"{path} was decoded"))
    assert images.read_image_size(tmp_path / name) == (64, 64)


def test_decompression_bomb_sized_image(tmp_path, tiny_sd1_ckpt, no_model_loading):
    folder = images_folder(tmp_path)
    png_header_only(folder / "huge.png", 20000, 20000)
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", folder.parent),
                    out=tmp_path / "out")
    assert message == (f"error: image {folder / 'huge.png'} is 20000x20000 (400 megapixels), over the decoder's "
                       "limit of 179 megapixels: resize it (e.g. tools/resize_images_to_resolution.py) or remove it")


def test_a_camera_jpeg_with_data_after_its_end_marker_is_accepted(tmp_path):
    """The truncation check reads the file's last bytes only; a JPEG with trailing data is decoded to be sure."""
    from library.data.images import read_image_size

    path = tmp_path / "motion.jpg"
    noise_image(path, quality=90)
    path.write_bytes(path.read_bytes() + b"\x00\x00ftypmp42" + bytes(200))  # e.g. an appended video
    assert read_image_size(path) == (64, 64)


def test_cmyk_16_bit_and_palette_images_are_converted_not_refused(tmp_path):
    """Valid images of unusual modes load as RGB with the right colours (PIL's plain convert() would
    clip a 16-bit gray image to white)."""
    from library.data.images import load_image, read_image_size

    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    gray16 = np.full((64, 64), 32768, dtype=np.uint16)  # mid gray in 16 bits
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    palette = Image.new("RGB", (64, 64), (255, 0, 0)).convert("P", palette=Image.ADAPTIVE)
    palette.save(tmp_path / "palette.png", transparency=0)

    for name in ("cmyk.jpg", "gray16.png", "palette.png"):
        assert read_image_size(tmp_path / name) == (64, 64)
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (64, 64, 3) and abs(cmyk[..., 0].mean() - 255) < 3 and cmyk[..., 1].mean() < 3
    gray = load_image(tmp_path / "gray16.png")
    assert gray.shape == (64, 64, 3) and np.all(np.abs(gray.astype(int) - 128) <= 1)
    gray_rgba = load_image(tmp_path / "gray16.png", with_alpha=True)
    assert gray_rgba.shape == (64, 64, 4) and np.all(gray_rgba[..., 3] == 255)
    red = load_image(tmp_path / "palette.png", with_alpha=True)
    assert red.shape == (64, 64, 4) and np.all(red[..., 3] == 0)  # index 0 is the transparent colour


def test_only_unsupported_image_formats(tmp_path, tiny_sd1_ckpt, no_model_loading):
    folder = tmp_path / "data" / "2_toy"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "a.gif")
    Image.new("RGB", (64, 64)).save(folder / "b.tiff")
    with Records("library.data.dataset") as log:
        message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", folder.parent),
                        out=tmp_path / "out")
    assert message.startswith(f"error: No data found in --train_data_dir {folder.parent}: ")
    assert any(f"no images in {folder} (2 file(s) of formats that are not read, e.g. a.gif, b.tiff: convert them "
               "to .png/.jpg/.jpeg/.webp/.bmp); subset skipped" in m for m in log.messages), log.messages


def test_same_stem_images_name_both_files_in_the_cache_warning(tmp_path, tiny_sd1_ckpt):
    folder = images_folder(tmp_path, "data")
    Image.new("RGB", (64, 64), (0, 200, 0)).save(folder / "img000.jpg")  # img000.png exists
    with Records("library.data.latent_cache") as log:
        train_network.main([str(a) for a in train_args(tiny_sd1_ckpt, tmp_path / "out", folder.parent,
                                                       cache_latents_to_disk=True)])
    expected = (f"{folder / 'img000.jpg'} and {folder / 'img000.png'} have the same name stem, so both would be "
                f"cached in img000_0064x0064_sd.npz; {folder / 'img000.png'} is cached in memory only")
    assert any(m.startswith(expected) for m in log.messages), log.messages


# -------------------------------------------------------------------------------- captions, folders

def test_caption_that_is_not_utf8(tmp_path, tiny_sd1_ckpt, no_model_loading):
    folder = images_folder(tmp_path)
    (folder / "img000.txt").write_bytes("un caf\xe9 noir".encode("latin-1"))
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", folder.parent),
                    out=tmp_path / "out")
    assert message == (f"error: caption file {folder / 'img000.txt'} is not UTF-8 (invalid byte at offset 6): "
                       "re-save it with UTF-8 encoding")


def test_missing_caption_files_are_named_in_a_warning(tmp_path, tiny_sd1_ckpt):
    """kohya trains such images with an empty caption; so do we, but the files are named."""
    folder = images_folder(tmp_path)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
                       f'[[datasets.subsets]]\nimage_dir = "{folder.as_posix()}"\n')
    with Records("library.data.subsets") as log:
        train_network.main([str(a) for a in base_train_args(tiny_sd1_ckpt, tmp_path / "out", dataset_config=dataset,
                                                             debug_dataset=True)])
    assert f"2 image(s) in {folder} have no .txt caption file and the subset has no class_tokens: their caption " \
           "is empty (first: img000.png)" in log.messages
    assert not (tmp_path / "out").exists()


def test_empty_training_folder(tmp_path, tiny_sd1_ckpt, no_model_loading):
    (tmp_path / "data").mkdir()
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", tmp_path / "data"),
                    out=tmp_path / "out")
    assert message == (f"error: No data found in --train_data_dir {tmp_path / 'data'}: images must be in sub-folders "
                       "named '<repeats>_<name>', e.g. '10_sks dog' (10 repeats; 'sks dog' is the caption of images "
                       "without a caption file). Sub-folders seen: none.")


def test_images_directly_in_train_data_dir_get_the_repeats_folder_fix(tmp_path, tiny_sd1_ckpt, no_model_loading):
    write_shapes_folder(tmp_path / "data", 3)  # the classic mistake: no '<repeats>_<name>' folder
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", tmp_path / "data"),
                    out=tmp_path / "out")
    assert message.startswith(f"error: No data found in --train_data_dir {tmp_path / 'data'}: images must be in "
                              "sub-folders named '<repeats>_<name>'")
    assert message.endswith(f"Sub-folders seen: none. 3 image(s) lie directly in {tmp_path / 'data'}: move them "
                            "into such a sub-folder.")


def test_subset_folder_without_images(tmp_path, tiny_sd1_ckpt, no_model_loading):
    (tmp_path / "data" / "5_dog").mkdir(parents=True)
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", tmp_path / "data"),
                    out=tmp_path / "out")
    assert message.endswith("Sub-folders seen: '5_dog'.")


# ---------------------------------------------------------------------------------------- TOML files

def test_misspelled_dataset_toml_key_gets_the_closest_name(tmp_path, data, tiny_sd1_ckpt, no_model_loading):
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '
                       f'"{(data / "2_toy").as_posix()}"\nnum_repeat = 2\n')
    message = fails(train_network.main, base_train_args(tiny_sd1_ckpt, tmp_path / "out", dataset_config=dataset),
                    out=tmp_path / "out")
    assert message == (f"error: invalid dataset config {dataset}: datasets[0].subsets[0].num_repeat: unknown key "
                       "'num_repeat'; did you mean 'num_repeats'?")


def test_wrong_value_type_in_dataset_toml(tmp_path, data, tiny_sd1_ckpt, no_model_loading):
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '
                       f'"{(data / "2_toy").as_posix()}"\nflip_aug = "yes"\n')
    message = fails(train_network.main, base_train_args(tiny_sd1_ckpt, tmp_path / "out", dataset_config=dataset),
                    out=tmp_path / "out")
    assert message == (f"error: invalid dataset config {dataset}: datasets[0].subsets[0].flip_aug: expected bool "
                       "(got 'yes')")


@pytest.mark.parametrize("line, expected", [
    ("network_dimm = 8", "unknown argument 'network_dimm' (did you mean 'network_dim'?)"),
    ("network_dim = 'eight'", "'network_dim' = 'eight'"),  # then the expected type (int)
])
def test_bad_args_toml_key_or_value(tmp_path, capsys, line, expected):
    config = tmp_path / "args.toml"
    config.write_text(line + "\n")
    with pytest.raises(SystemExit) as info:
        train_network.main(["--config_file", str(config), "--output_dir", str(tmp_path / "out")])
    assert info.value.code == 2  # argparse's status for a bad command line
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: --config_file {config}: {expected}" in last_line, last_line
    assert "int" in last_line.rpartition(expected)[2] or "dimm" in expected
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- checkpoints

def test_missing_checkpoint(tmp_path, data):
    message = fails(train_network.main, train_args(tmp_path / "nope.safetensors", tmp_path / "out", data),
                    out=tmp_path / "out")
    assert message == f"error: --pretrained_model_name_or_path {tmp_path / 'nope.safetensors'}: no such file or folder"


def test_truncated_safetensors_checkpoint(tmp_path, data, tiny_sd1_ckpt):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_sd1_ckpt.read_bytes()[:5000])
    message = fails(train_network.main, train_args(cut, tmp_path / "out", data), out=tmp_path / "out")
    assert message.startswith(f"error: {cut}: not a readable safetensors file (")
    assert message.endswith("an interrupted download or copy leaves such files, fetch it again")


@pytest.mark.parametrize("content, reason", [
    (b"this is not a pickle" * 10, "(its pickle data is damaged)"),
    (None, "("),  # a zip archive cut in half
    (b"", None),
])
def test_corrupt_ckpt_checkpoint(tmp_path, data, tiny_sd1_ckpt, content, reason):
    from library.demo.tiny_sd import write_tiny_sd_checkpoint

    bad = tmp_path / "model.ckpt"
    if content is None:
        whole = write_tiny_sd_checkpoint(tmp_path / "whole.ckpt", fmt="ckpt").read_bytes()
        content = whole[: len(whole) // 3]
    bad.write_bytes(content)
    message = fails(train_network.main, train_args(bad, tmp_path / "out", data), out=tmp_path / "out")
    if reason is None:
        assert message == (f"error: {bad}: the file is empty (0 bytes); an interrupted download or copy leaves such "
                           "files, fetch it again")
    else:
        assert message.startswith(f"error: {bad}: not a readable PyTorch checkpoint {reason}")
        assert message.endswith("fetch it again (or use its .safetensors version)")


@pytest.mark.parametrize("script, fix", [(train_network, "use sdxl_train_network.py"), (fine_tune, "use sdxl_train.py"),
                                         (train_db, "use sdxl_train.py")])
def test_sdxl_checkpoint_names_the_sdxl_script_of_the_running_tool(tmp_path, data, tiny_sdxl_ckpt, script, fix):
    argv = train_args(tiny_sdxl_ckpt, tmp_path / "out", data) if script is train_network else \
        model_args(tiny_sdxl_ckpt, tmp_path / "out", data)
    message = fails(script.main, argv, out=tmp_path / "out")
    assert message == f"error: {tiny_sdxl_ckpt} is an SDXL checkpoint (conditioner.embedders.* keys): {fix}"


def test_sd1_checkpoint_given_to_sdxl_train_names_fine_tune(tmp_path, data, tiny_sd1_ckpt):
    message = fails(sdxl_train.main, model_args(tiny_sd1_ckpt, tmp_path / "out", data), out=tmp_path / "out")
    assert message == f"error: {tiny_sd1_ckpt} is an SD1/SD2 checkpoint (cond_stage_model.* keys): use fine_tune.py"


def test_missing_vae(tmp_path, data, tiny_sd1_ckpt, no_model_loading):
    vae = tmp_path / "vae.safetensors"
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, vae=vae),
                    out=tmp_path / "out")
    assert message == (f"error: --vae {vae}: no such file or folder (a VAE .safetensors/.ckpt file, a full checkpoint "
                       "or a Diffusers VAE folder)")


# ------------------------------------------------------------------------------- LoRA and resume

def test_lora_of_another_model_family(tmp_path, data, tiny_sd1_ckpt):
    lora = write_lora(tmp_path / "xl_lora.safetensors", SDXL_LORA_NAMES)
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, network_weights=lora),
                    out=tmp_path / "out")
    assert message.startswith(f"error: --network_weights: {lora}: 9 of 9 LoRA weights match no module of this "
                              "network, e.g. ")
    assert "The file looks like an SDXL LoRA" in message
    assert message.endswith("Load the LoRA with the base model it was trained for.")


def test_full_checkpoint_given_as_network_weights(tmp_path, data, tiny_sd1_ckpt, no_model_loading):
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data,
                                                   network_weights=tiny_sd1_ckpt), out=tmp_path / "out")
    assert message == (f"error: --network_weights {tiny_sd1_ckpt} is a model checkpoint, not a LoRA/network file: "
                       "give it with --pretrained_model_name_or_path; --network_weights takes a file written by a "
                       "network training run (or by networks/extract_lora_from_models.py)")


def test_corrupt_network_weights(tmp_path, data, tiny_sd1_ckpt, no_model_loading):
    lora = write_lora(tmp_path / "lora.safetensors", ["lora_unet_mid_block_attentions_0_proj_in"])
    lora.write_bytes(lora.read_bytes()[:40])
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, network_weights=lora),
                    out=tmp_path / "out")
    assert message.startswith(f"error: --network_weights {lora}: not a readable safetensors file (")
    assert message.endswith("an interrupted download or copy leaves such files, fetch or save it again")


def test_bad_network_args_value(tmp_path, data, tiny_sd1_ckpt):
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data,
                                                   network_args=["conv_dim=abc"]), out=tmp_path / "out")
    assert message == "error: --network_args conv_dim='abc': expected int (e.g. conv_dim=4)"


def write_state(folder: Path, weights: dict[str, torch.Tensor], step: int = 2) -> Path:
    """A state folder as --save_state writes it (the files the checks read)."""
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": 1, "current_step": step}))
    return folder


def test_resume_from_a_state_of_another_network(tmp_path, data, tiny_sd1_ckpt):
    state = write_state(tmp_path / "xl-state", {f"{n}.alpha": torch.tensor(2.0) for n in SDXL_LORA_NAMES})
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, resume=state),
                    out=tmp_path / "out")
    assert message.startswith(f"error: --resume {state}: the state was saved for another model or network (3 of 3 "
                              "weights in model.safetensors do not fit: e.g. lora_te1_text_model_encoder_layers_0_")
    assert message.endswith("resume with the base model and --network_* flags of the run that saved it")


def test_a_slow_in_memory_latent_cache_suggests_the_disk_cache(tmp_path, data, tiny_sd1_ckpt, monkeypatch):
    from library.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "CACHE_TO_DISK_HINT_S", 0.0)  # the tiny VAE is fast; any pass counts as slow
    hint = ("with --cache_latents_to_disk the next run on these images (and a --resume) reads them from disk instead, "
            "and with --cache_latents_on_first_use training starts before they are all encoded")
    with Records("library.training.trainer") as log:
        train_network.main([str(a) for a in train_args(tiny_sd1_ckpt, tmp_path / "mem", data, cache_latents=True)])
    assert [m for m in log.messages if m.startswith("caching the latents of 2 images took ") and m.endswith(hint)]
    with Records("library.training.trainer") as log:
        train_network.main([str(a) for a in train_args(tiny_sd1_ckpt, tmp_path / "disk", data, cache_latents=True,
                                                       cache_latents_to_disk=True)])
    assert not [m for m in log.messages if hint in m]


@pytest.fixture
def saved_state(tmp_path, data, tiny_sd1_ckpt) -> Path:
    """A real state of a 1-step AdamW run (``<out>/lora-state``)."""
    train_network.main([str(a) for a in train_args(tiny_sd1_ckpt, tmp_path / "first", data, save_state=True)])
    state = tmp_path / "first" / "lora-state"
    assert json.loads((state / "train_state.json").read_text())["optimizer"] == "torch.optim.adamw.AdamW"
    return state


def test_resume_with_another_optimizer_is_refused_in_one_line(tmp_path, data, tiny_sd1_ckpt, saved_state):
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, resume=saved_state,
                                                   optimizer_type="Lion"), out=tmp_path / "out")
    assert message == (f"error: --resume {saved_state}: the state was saved with optimizer torch.optim.adamw.AdamW, "
                       "this run uses lion_pytorch.lion_pytorch.Lion: resume with the --optimizer_type of the run "
                       "that saved it (or start a new run from the weights it saved)")


def test_resume_with_other_parameter_groups_is_refused_in_one_line(tmp_path, data, tiny_sd1_ckpt, saved_state):
    # --text_encoder_lr 0 freezes the text encoder's LoRA: one optimizer group instead of two
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, resume=saved_state,
                                                   text_encoder_lr=0), out=tmp_path / "out")
    assert message.startswith(f"error: --resume {saved_state}: its optimizer state does not fit this run's optimizer "
                              "(ValueError: loaded state dict has a different number of parameter groups")
    assert message.endswith("resume with those of the run that saved it")


def test_state_without_an_optimizer_name_still_resumes(tmp_path, data, tiny_sd1_ckpt, saved_state):
    """States of kohya-ss/sd-scripts (and older ones of ours) do not name their optimizer."""
    info = saved_state / "train_state.json"
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "optimizer"}))
    argv = train_args(tiny_sd1_ckpt, tmp_path / "out", data, resume=saved_state)
    argv[argv.index("--max_train_steps") + 1] = "2"
    train_network.main([str(a) for a in argv])
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_resume_from_a_folder_that_is_not_a_state(tmp_path, data, tiny_sd1_ckpt, no_model_loading):
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, resume=data),
                    out=tmp_path / "out")
    assert message == (f"error: --resume {data}: not a training state folder (no train_state.json); give a "
                       "'<output_name>-state' folder written with --save_state (to continue from a LoRA file alone, "
                       "use --network_weights)")


def test_initial_step_with_resume_is_refused(tmp_path, data, tiny_sd1_ckpt, no_model_loading):
    state = write_state(tmp_path / "lora-state", {}, step=7)
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, resume=state,
                                                   initial_step=3), out=tmp_path / "out")
    assert message == ("error: --initial_step 3 cannot be used with --resume: the resumed run continues at the "
                       "state's step 7. Drop --initial_step (or drop --resume to start new weights at that step)")


# ---------------------------------------------------------------------------------- sample prompts

@pytest.mark.parametrize("line, expected", [
    ("a cat --w abc", "bad value 'abc' for --w (width in pixels): expected an integer"),
    ("a cat --ss nosuch", "unknown sampler 'nosuch'; valid samplers: ddim, pndm, lms, euler, euler_a"),
])
def test_bad_sample_prompt_file_fails_at_start(tmp_path, data, tiny_sd1_ckpt, no_model_loading, line, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(line + "\n")
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data, sample_prompts=prompts,
                                                   sample_every_n_steps=1), out=tmp_path / "out")
    assert message.startswith(f"error: {prompts}:1: {expected}")


# ------------------------------------------------------------------------------------------ outputs

def test_output_folder_below_a_file(tmp_path, data, tiny_sd1_ckpt, no_model_loading):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, blocker / "out", data))
    assert message == (f"error: --output_dir {blocker / 'out'}: cannot be created, {blocker} is a file; give a "
                       "folder you can write to")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where nothing can be created")
def test_output_folder_that_cannot_be_created_although_permissions_allow(tmp_path, data, tiny_sd1_ckpt,
                                                                          no_model_loading):
    """/proc passes a permission-bit check (as root) but takes no new folder: the check tries for real."""
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, "/proc/no-such-output", data))
    assert message == ("error: --output_dir /proc/no-such-output: cannot write there (No such file or directory); "
                       "give a folder you can write to")


def test_console_log_file_that_cannot_be_written(tmp_path, data, tiny_sd1_ckpt, monkeypatch, no_model_loading):
    import library.log

    monkeypatch.setattr(library.log, "_configured", False)  # in-process: logging is set up once per process
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, tmp_path / "out", data,
                                                   console_log_file=blocker / "log.txt"), out=tmp_path / "out")
    assert message.startswith(f"error: --console_log_file {blocker / 'log.txt'}: cannot write it (")
    assert message.endswith("give a file in an existing folder you can write to")


def test_full_disk_at_save_keeps_the_previous_file(tmp_path, data, tiny_sd1_ckpt, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    previous = out / "lora.safetensors"
    previous.write_bytes(b"the LoRA of the previous run")

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # the disk fills up part-way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    message = fails(train_network.main, train_args(tiny_sd1_ckpt, out, data))
    assert message == (f"error: cannot write {previous}: the disk is full (No space left on device); nothing was "
                       "replaced. Free space on that disk or choose another output folder, then run again")
    assert previous.read_bytes() == b"the LoRA of the previous run"
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors"]  # no temporary file left behind


# -------------------------------------------------------------------------------------------- FLUX

def flux_args(files, out: Path, data_dir: Path, **overrides) -> list[str]:
    values = dict(train_data_dir=data_dir, caption_extension=".txt", network_module="networks.lora_flux",
                  t5xxl_max_token_length=32, max_train_steps=1, pretrained_model_name_or_path=None)
    values.update(overrides)
    return files.train_args() + base_train_args(files.dit, out, **values)


def test_flux_resolution_not_a_multiple_of_16_is_refused_before_loading(tmp_path, data, tiny_flux,
                                                                         no_model_loading):
    message = fails(flux_train_network.main, flux_args(tiny_flux, tmp_path / "out", data, resolution=72),
                    out=tmp_path / "out")
    assert message == ("error: dataset: resolution 72x72 is not a multiple of 16, which this model needs (without "
                       "bucketing images are trained at that size): use e.g. --resolution 64 (resolution = 64), or "
                       "--enable_bucket")


def test_flux_empty_tokenizer_cache_dir_is_named_before_the_dit_loads(tmp_path, data, tiny_flux, monkeypatch):
    import library.families.flux.loading as flux_loading

    def refuse(*_args, **_kwargs):
        raise AssertionError("the DiT was read before the tokenizers were found")

    monkeypatch.setattr(flux_loading, "read_checkpoint", refuse)  # what load_flux_dit reads the file with
    empty = tmp_path / "tokenizers"
    empty.mkdir()
    argv = flux_args(tiny_flux, tmp_path / "out", data)
    argv[argv.index("--tokenizer_cache_dir") + 1] = str(empty)
    message = fails(flux_train_network.main, argv, out=tmp_path / "out")
    assert message.startswith(f"error: T5 tokenizer not found: folder {empty / 'google_t5-v1_1-xxl'} (from "
                              "--tokenizer_cache_dir) does not exist")
    assert message.endswith(f"pass --tokenizer_cache_dir {empty}")
