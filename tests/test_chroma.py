"""Chroma: the DiT against diffusers (tiny config, weights through diffusers' own converter), the
full-size layout on meta, file detection, and flux_train_network.py / flux_minimal_inference.py
with --model_type chroma end to end on a tiny setup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from library.demo.shapes import write_shapes_folder
from library.demo.tiny_chroma import (random_chroma_state_dict, tiny_chroma_config, write_tiny_chroma_dit,
                                      write_tiny_chroma_setup)
from library.families.flux.chroma import Chroma, ChromaConfig, attended_text, is_chroma_state_dict
from library.families.flux.model import image_ids, pack_latents, text_ids
from library.families.sd.checkpoint.common import CheckpointError
from tests.train_helpers import base_train_args, read_metadata, run_script

torch.set_num_threads(1)

SCRIPT = "flux_train_network.py"
FULL_SIZE_PARAMETERS = 8_899_983_424  # the released Chroma's "8.9B"


def _inputs(config: ChromaConfig, batch: int = 2, height: int = 8, width: int = 6, n_txt: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels // 4, height, width, generator=g)
    return dict(img=pack_latents(latents), img_ids=image_ids(batch, height, width),
                txt=torch.randn(batch, n_txt, config.context_in_dim, generator=g), txt_ids=text_ids(batch, n_txt),
                timesteps=torch.rand(batch, generator=g))


def _tiny_model(seed: int = 1) -> Chroma:
    model = Chroma(tiny_chroma_config())
    model.load_state_dict(random_chroma_state_dict(tiny_chroma_config(), seed=seed))
    return model.eval()


# -- parity with diffusers ------------------------------------------------------------------------------


def _to_diffusers(state_dict: dict[str, torch.Tensor], config: ChromaConfig) -> dict[str, torch.Tensor]:
    """Our weights -> diffusers names through ``convert_chroma_transformer_checkpoint_to_diffusers``.

    The converter hard-codes the full-size split of a single block's fused ``linear1``
    (3 x 3072 + 12288 rows): each part of our tiny linear1 is placed at its full-size offset and
    the converted parts are cut back (as tests/test_flux_model.py does for FLUX).
    """
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    hidden, mlp = config.hidden_size, config.mlp_hidden_dim
    checkpoint = {}
    for key, value in state_dict.items():
        if key.startswith("single_blocks.") and ".linear1." in key:
            padded = torch.zeros((3 * 3072 + 12288, *value.shape[1:]))
            for offset, part in zip((0, 3072, 6144, 9216), torch.split(value, [hidden, hidden, hidden, mlp])):
                padded[offset:offset + part.shape[0]] = part
            value = padded
        checkpoint["model.diffusion_model." + key] = value.clone()
    converted = convert_chroma_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint, f"diffusers' converter left keys unused: {sorted(checkpoint)}"
    for key in converted:
        if key.startswith("single_transformer_blocks.") and (".attn.to_" in key or ".proj_mlp." in key):
            converted[key] = converted[key][:mlp if ".proj_mlp." in key else hidden]
    return converted


@pytest.fixture(scope="module")
def diffusers_pair():
    from diffusers import ChromaTransformer2DModel

    config = tiny_chroma_config()
    state_dict = random_chroma_state_dict(config, seed=1)
    ours = Chroma(config)
    ours.load_state_dict(state_dict)
    theirs = ChromaTransformer2DModel(
        in_channels=config.in_channels, num_layers=config.depth, num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim, axes_dims_rope=config.axes_dim,
        approximator_num_channels=config.approximator_in_dim, approximator_hidden_dim=config.approximator_hidden_size,
        approximator_layers=config.approximator_depth)
    theirs.load_state_dict(_to_diffusers(state_dict, config), strict=True)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "t5_mask"])
def test_matches_diffusers_chroma_transformer(diffusers_pair, masked):
    ours, theirs = diffusers_pair
    x = _inputs(ours.config)
    mask = None
    kwargs = {}
    if masked:  # T5's token mask: captions of 4 and 6 tokens out of 7
        mask = torch.arange(7)[None] < torch.tensor([[4], [6]])
        # diffusers' pipeline gives the transformer [caption + 1 padding token; image] as its mask
        image_tokens = torch.ones(2, x["img"].shape[1], dtype=torch.bool)
        kwargs["attention_mask"] = torch.cat((attended_text(mask), image_tokens), 1)
    with torch.no_grad():
        expected = theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                          img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], return_dict=False, **kwargs)[0]
        got = ours(**x, txt_attention_mask=mask)
        # The only difference left is the approximator's RMS-norm eps (the original's 1e-6, diffusers'
        # torch default): with diffusers' eps the two agree to float rounding.
        eps = [norm.eps for norm in ours.distilled_guidance_layer.norms]
        for norm in ours.distilled_guidance_layer.norms:
            norm.eps = torch.finfo(torch.float32).eps
        got_same_eps = ours(**x, txt_attention_mask=mask)
        for norm, e in zip(ours.distilled_guidance_layer.norms, eps):
            norm.eps = e
    assert got.shape == (2, 12, ours.config.in_channels)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got_same_eps, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4)  # eps 1e-6 vs 1.2e-7: ~1e-5 here


def test_text_mask_attends_the_caption_and_one_padding_token():
    model = _tiny_model()
    x = _inputs(model.config, n_txt=8)
    mask = torch.arange(8)[None].expand(2, -1) < 5  # 5 caption tokens, 3 padding tokens
    later_padding = dict(x, txt=x["txt"].clone())
    later_padding["txt"][:, 6:] = torch.randn(2, 2, model.config.context_in_dim)
    first_padding = dict(x, txt=x["txt"].clone())
    first_padding["txt"][:, 5] = torch.randn(2, model.config.context_in_dim)
    with torch.no_grad():
        base = model(**x, txt_attention_mask=mask)
        torch.testing.assert_close(model(**later_padding, txt_attention_mask=mask), base, atol=1e-6, rtol=0)
        assert (model(**first_padding, txt_attention_mask=mask) - base).abs().max() > 1e-3
        assert (model(**x) - base).abs().max() > 1e-3  # no mask: every token counts


def test_guidance_and_timestep_reach_every_block_through_the_approximator():
    model = _tiny_model()
    x = _inputs(model.config)
    with torch.no_grad():
        base = model(**x)
        assert torch.equal(model(**x, guidance=torch.zeros(2)), base)  # None means guidance 0
        assert (model(**x, guidance=torch.full((2,), 3.0)) - base).abs().max() > 1e-3
        mods = model.modulations(x["timesteps"], None, torch.float32)
    assert mods.shape == (2, model.config.num_modulations, model.config.hidden_size)
    assert model.config.num_modulations == 3 * 4 + 12 * 3 + 2


# -- full size on meta ------------------------------------------------------------------------------------


def test_full_size_layout_matches_diffusers_chroma():
    """ChromaConfig() is the released Chroma (the reference's chroma_params and diffusers'
    ChromaTransformer2DModel defaults); our keys, through diffusers' converter, are diffusers' model."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        ours = Chroma(ChromaConfig())
        theirs = ChromaTransformer2DModel()
    state_dict = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == FULL_SIZE_PARAMETERS
    assert len(state_dict) == 643 and ChromaConfig().num_modulations == 344
    checkpoint = {"model.diffusion_model." + k: v for k, v in state_dict.items()}
    converted = convert_chroma_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ChromaConfig.from_state_dict(state_dict) == ChromaConfig()
    assert not any(".img_mod." in k or ".modulation." in k or k.startswith(("time_in", "vector_in", "guidance_in"))
                   for k in state_dict)


def test_lora_targets_are_the_block_linears_without_modulations():
    import networks.lora_flux as lora_flux

    with torch.device("meta"):
        model = Chroma(ChromaConfig())
    plan = lora_flux.plan_dit_modules(model, 4, 1.0, lora_flux.parse_flux_network_args({}))
    names = {planned.lora_name for planned, _ in plan}
    assert len(names) == 19 * 8 + 38 * 2
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_18_txt_mlp_2",
            "lora_unet_single_blocks_37_linear1", "lora_unet_single_blocks_0_linear2"} <= names
    assert not any("mod" in n or "distilled_guidance" in n for n in names)
    in_dims = lora_flux.plan_dit_modules(model, 4, 1.0, lora_flux.parse_flux_network_args({"in_dims": "[4,4,4,4,4]"}))
    assert {p.lora_name for p, _ in in_dims} - names == {"lora_unet_img_in", "lora_unet_txt_in"}


# -- detection ------------------------------------------------------------------------------------------


def test_files_are_told_apart_by_their_keys(tmp_path, tiny_flux):
    from library.families.flux.chroma_loading import load_chroma_dit
    from library.families.flux.loading import load_flux_dit

    chroma_file = write_tiny_chroma_dit(tmp_path / "chroma.safetensors", prefix="model.diffusion_model.")
    assert is_chroma_state_dict(load_file(str(chroma_file)))
    model = load_chroma_dit(chroma_file)
    assert isinstance(model, Chroma) and model.config == tiny_chroma_config()
    with pytest.raises(CheckpointError, match="this is a Chroma model .*add --model_type chroma"):
        load_flux_dit(chroma_file)
    with pytest.raises(CheckpointError, match="FLUX.1 dev DiT, not Chroma.*drop --model_type chroma"):
        load_chroma_dit(tiny_flux.dit)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_img_in.lora_down.weight": torch.zeros(4, 64)}, str(lora))
    with pytest.raises(CheckpointError, match="not a Chroma DiT file.*--network_weights"):
        load_chroma_dit(lora)


# -- training end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chroma(tmp_path_factory):
    return write_tiny_chroma_setup(tmp_path_factory.mktemp("tiny_chroma"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("chroma_data")
    images = write_shapes_folder(root / "train" / "5_sks", 4, seed=3, trigger="sks")
    return root / "train", images


def chroma_args(files, out: Path, data: Path, **overrides) -> list[str]:
    values = dict(train_data_dir=data, caption_extension=".txt", bucket_reso_steps=32, cache_latents=True,
                  network_module="networks.lora_flux", t5xxl_max_token_length=32, learning_rate=3e-3,
                  pretrained_model_name_or_path=None)
    values.update(overrides)
    return files.train_args() + base_train_args(files.dit, out, **values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_chroma, dataset):
    """T5-only Chroma LoRA run (no --clip_l, no --apply_t5_attn_mask, no --guidance_scale: Chroma's
    defaults), with a CFG preview of a negative prompt at the end."""
    root = tmp_path_factory.mktemp("chroma_run")
    prompts = root / "prompts.txt"
    prompts.write_text("sks, a red circle --n blurry, dark --l 4.0 --w 64 --h 64 --s 3 --d 7\n")
    out = root / "out"
    run_script(SCRIPT, chroma_args(tiny_chroma, out, dataset[0], max_train_steps=None, max_train_epochs=3,
                                   network_dim=8, network_alpha=4, sample_prompts=prompts, sample_every_n_epochs=3,
                                   model_prediction_type="raw", timestep_sampling="sigmoid"))
    return out


def _models(files, *extra: str):
    from library.args import setup_flux_network_parser
    from library.families.flux.chroma_family import ChromaFamily

    family = ChromaFamily()
    args = setup_flux_network_parser().parse_args(files.train_args() + ["--t5xxl_max_token_length", "32", *extra])
    family.validate_args(args)
    return family, family.load_models(args, torch.device("cpu"), torch.float32), args


def test_lora_file_has_chroma_names_and_metadata(trained, tiny_chroma):
    import networks.lora_flux as lora_flux

    saved = load_file(str(trained / "lora.safetensors"))
    family, models, _ = _models(tiny_chroma)
    expected = lora_flux.create_network(1.0, 8, 4, None, family.network_text_encoders(models),
                                        models.denoiser).state_dict()
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    names = {k.split(".")[0] for k in saved}
    assert len(names) == 3 * 8 + 4 * 2  # every block Linear, no modulation layers, no text encoder
    assert not any(n.startswith("lora_te") or "mod" in n for n in names)

    md = read_metadata(trained / "lora.safetensors")
    assert (md["ss_base_model_version"], md["ss_model_type"]) == ("chroma", "chroma")
    assert md["modelspec.architecture"] == "chroma/lora"
    assert md["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert (md["ss_guidance_scale"], md["ss_apply_t5_attn_mask"]) == ("0.0", "True")
    assert md["ss_timestep_sampling"] == "sigmoid"
    samples = list((trained / "sample").glob("lora_e000003_00_*_7.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_training_lowers_the_denoising_loss(trained, tiny_chroma, dataset):
    import networks.lora_flux as lora_flux
    from library.demo.evaluate import family_denoising_loss, load_images

    family, models, args = _models(tiny_chroma, "--model_prediction_type", "raw")
    latents = family.encode_images(models, load_images(dataset[1]))
    captions = [p.with_suffix(".txt").read_text() for p in dataset[1]]
    batch = {"input_ids": family.make_tokenize_fn(models, args)(captions)}
    conditioning = family.encode_text(models, batch, args)
    before = family_denoising_loss(family, models, args, latents, conditioning)
    network, _ = lora_flux.create_network_from_weights(1.0, trained / "lora.safetensors", None,
                                                       family.network_text_encoders(models), models.denoiser,
                                                       for_inference=True)
    network.apply_to(family.network_text_encoders(models), models.denoiser, True, True)
    after = family_denoising_loss(family, models, args, latents, conditioning)
    assert after < 0.9 * before, (before, after)


def test_previews_use_real_cfg_with_the_negative_prompt(tiny_chroma):
    from library.sampling.prompts import SamplePrompt

    family, models, args = _models(tiny_chroma)

    def image(**fields) -> np.ndarray:
        prompt = SamplePrompt(**{"prompt": "sks, a red circle", "width": 64, "height": 64, "steps": 3,
                                 "guidance_scale": 0.0, **fields})
        result = family.sample_image(models, prompt, torch.Generator().manual_seed(1), args, "cpu", torch.float32)
        return np.asarray(result, dtype=np.int16)

    plain = image(scale=1.0, negative_prompt="blurry")
    assert np.array_equal(image(scale=1.0, negative_prompt="a blue square"), plain)  # CFG 1: no negative pass
    guided = image(scale=4.0, negative_prompt="blurry")
    assert np.abs(guided - plain).mean() > 1.0
    assert np.abs(image(scale=4.0, negative_prompt="a blue square") - guided).mean() > 0.5
    assert family.sample_defaults(args).guidance_scale == 0.0


def test_resume_continues_bit_identically(tmp_path, tiny_chroma, dataset):
    common = dict(max_train_steps=4, network_dim=4, network_alpha=2, save_every_n_steps=2, save_state=True,
                  network_dropout=0.1, cache_text_encoder_outputs=True, network_train_unet_only=True)
    full = tmp_path / "full"
    run_script(SCRIPT, chroma_args(tiny_chroma, full, dataset[0], **common))
    resumed = tmp_path / "resumed"
    run_script(SCRIPT, chroma_args(tiny_chroma, resumed, dataset[0], resume=full / "lora-step00000002-state",
                                   **common))
    a, b = load_file(str(full / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    ([], "this is a Chroma model"),  # the Chroma file without --model_type chroma
    (["--model_type", "chroma", "--network_train_text_encoder_only"], "only T5 can be trained"),
])
def test_model_type_must_match_the_file(tmp_path, tiny_chroma, dataset, tiny_flux, extra, message):
    import flux_train_network

    argv = [a for a in chroma_args(tiny_chroma, tmp_path / "out", dataset[0], max_train_steps=1)
            if a not in ("--model_type", "chroma")]
    argv += ["--clip_l", str(tiny_flux.clip_l), *extra]
    with pytest.raises(SystemExit) as info:
        flux_train_network.main(argv)
    assert message in str(info.value)


def test_flux_file_with_model_type_chroma_is_refused(tmp_path, tiny_flux, tiny_chroma, dataset):
    import flux_train_network

    argv = chroma_args(tiny_chroma, tmp_path / "out", dataset[0], max_train_steps=1)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tiny_flux.dit)
    with pytest.raises(SystemExit, match="FLUX.1 dev DiT, not Chroma .*: drop --model_type chroma"):
        flux_train_network.main(argv)


def test_minimal_inference_with_model_type_chroma(tmp_path, trained, tiny_chroma):
    import flux_minimal_inference
    from library.generation.flux import run

    lora = trained / "lora.safetensors"

    def generate(folder: str, *extra: str) -> np.ndarray:
        args = flux_minimal_inference.setup_parser().parse_args([
            "--ckpt_path", str(tiny_chroma.dit), "--model_type", "chroma", "--t5xxl", str(tiny_chroma.t5xxl),
            "--ae", str(tiny_chroma.ae), "--tokenizer_cache_dir", str(tiny_chroma.tokenizer_cache_dir),
            "--prompt", "sks, a red circle", "--negative_prompt", "blurry", "--width", "64", "--height", "64",
            "--steps", "3", "--seed", "3", "--dtype", "float32", "--t5xxl_max_token_length", "32",
            "--output_dir", str(tmp_path / folder), *extra])
        (path,) = run(args)
        image = Image.open(path)
        assert image.text["guidance"] == "0.0"
        return np.asarray(image, dtype=np.int16)

    base = generate("base")
    guided = generate("guided", "--cfg_scale", "4")
    assert np.abs(guided - base).mean() > 1.0
    applied = generate("applied", "--cfg_scale", "4", "--lora_weights", f"{lora};1.0")
    merged = generate("merged", "--cfg_scale", "4", "--lora_weights", f"{lora};1.0", "--merge_lora_weights")
    assert np.abs(applied - guided).mean() > 1.0
    assert np.abs(merged - applied).max() <= 3

    with pytest.raises(SystemExit, match="add --model_type chroma"):
        flux_minimal_inference.main(["--ckpt_path", str(tiny_chroma.dit), "--clip_l", str(tiny_chroma.t5xxl),
                                     "--t5xxl", str(tiny_chroma.t5xxl), "--ae", str(tiny_chroma.ae),
                                     "--tokenizer_cache_dir", str(tiny_chroma.tokenizer_cache_dir),
                                     "--output_dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--clip_l is required for FLUX.1"):
        flux_minimal_inference.main(["--ckpt_path", str(tiny_chroma.dit), "--t5xxl", str(tiny_chroma.t5xxl),
                                     "--ae", str(tiny_chroma.ae)])
