"""ControlNet-LLLite: the modules and file format (networks/control_net_lllite.py), the full-size key
list, and sdxl_train_control_net_lllite.py end to end.

The end-to-end run trains on white-half images whose control image is the image itself, over a base
model fitted to the same images under one caption (so it draws white halves but cannot know the side):
the trained network must make generation draw the side its guide image shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.demo.tiny_sd import randomize_
from library.demo.tiny_sdxl import TE1_WIDTH, TE2_WIDTH, tiny_sdxl_unet_config
from networks import control_net_lllite as lllite
from tests.train_helpers import base_train_args, run_script, tensorboard_events


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return randomize_(UNet2DConditionModel(**tiny_sdxl_unet_config()), 0).requires_grad_(False)


def unet_inputs(batch: int = 2, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_sdxl_unet_config()
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    context = torch.randn(batch, 5, TE1_WIDTH + TE2_WIDTH, generator=g)
    added = {"text_embeds": torch.randn(batch, 32, generator=g),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)}
    assert cfg["projection_class_embeddings_input_dim"] == 32 + 6 * cfg["addition_time_embed_dim"]
    return x, torch.tensor([500] * batch), context, added


def run_unet(unet, inputs) -> torch.Tensor:
    x, t, context, added = inputs
    with torch.no_grad():
        return unet(x, t, context, added_cond_kwargs=added).sample


def control_image(batch: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_up(network, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.unet_modules:
            module.up[0].weight.copy_(torch.randn(module.up[0].weight.shape, generator=g) * 0.5)
            module.up[0].bias.copy_(torch.randn(module.up[0].bias.shape, generator=g) * 0.1)


@pytest.fixture
def network(unet):
    net = lllite.create_network(unet, cond_emb_dim=8, mlp_dim=6)
    net.apply_to()
    yield net
    net.restore()


def test_tiny_targets_are_attn1_qkv_and_attn2_q_of_input_and_middle_blocks(unet):
    names = [p.name for p in lllite.plan_lllite(unet)]
    # tiny: level 1 (input_blocks.3, layers_per_block 1) has 2 transformer blocks; the middle block too
    expected = [f"lllite_unet_{block}_1_transformer_blocks_{k}_{layer}" for block in ("input_blocks_3", "middle_block")
                for k in range(2) for layer in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q")]
    assert names == expected
    # both sit at the second level: the control image is embedded to 1/16 of its size (depth 2)
    assert {p.depth for p in lllite.plan_lllite(unet)} == {2}


def test_fresh_network_leaves_the_unet_output_unchanged(unet, network):
    inputs = unet_inputs()
    network.restore()
    before = run_unet(unet, inputs)
    network.apply_to()
    network.set_cond_image(control_image())
    after = run_unet(unet, inputs)
    assert torch.equal(before, after)
    # the modules did run: a non-zero up projection moves the output
    randomize_up(network)
    changed = run_unet(unet, inputs)
    assert (changed - before).abs().max() > 1e-3


def test_multiplier_zero_and_no_image_switch_control_off(unet, network):
    inputs = unet_inputs()
    network.restore()
    plain = run_unet(unet, inputs)
    network.apply_to()
    randomize_up(network)
    network.set_cond_image(control_image())
    full = run_unet(unet, inputs)
    network.set_multiplier(0.5)
    half = run_unet(unet, inputs)
    assert (half - plain).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4
    network.set_multiplier(0.0)
    assert torch.equal(run_unet(unet, inputs), plain)
    network.set_multiplier(1.0)
    network.set_cond_image(None)
    assert torch.equal(run_unet(unet, inputs), plain)


def test_output_depends_on_the_control_image_per_sample(unet, network):
    randomize_up(network)
    inputs = unet_inputs()
    images = control_image()
    network.set_cond_image(images)
    both = run_unet(unet, inputs)
    network.set_cond_image(images.flip(0))
    swapped = run_unet(unet, inputs)
    assert (both - swapped).abs().max() > 1e-3
    # one image per sample: sample 0 with image 0 alone gives the same row
    network.set_cond_image(images[:1])
    single = run_unet(unet, tuple(v[:1] if torch.is_tensor(v) else {k: a[:1] for k, a in v.items()} for v in inputs))
    torch.testing.assert_close(single, both[:1], rtol=1e-4, atol=1e-5)


def test_guidance_batch_reuses_the_control_embedding(unet, network):
    """A [uncond, cond] batch of 2B rows with B control images: each half is conditioned like the B-batch."""
    randomize_up(network)
    inputs = unet_inputs(batch=2)
    doubled = tuple(torch.cat([v, v]) if torch.is_tensor(v) else {k: torch.cat([a, a]) for k, a in v.items()}
                    for v in inputs)
    network.set_cond_image(control_image(batch=2))
    torch.testing.assert_close(run_unet(unet, doubled), torch.cat([run_unet(unet, inputs)] * 2), rtol=1e-4, atol=1e-5)


def test_image_size_must_match_the_latents(unet, network):
    network.set_cond_image(control_image(size=96))  # latents are for 64 px
    with pytest.raises(lllite.LLLiteError, match="multiples of 32"):
        run_unet(unet, unet_inputs())


def test_gradients_reach_every_part_with_gradient_checkpointing(unet, network):
    randomize_up(network)
    unet.enable_gradient_checkpointing()
    unet.train()
    try:
        network.train()
        x, t, context, added = unet_inputs()
        network.set_cond_image(control_image())
        out = unet(x, t, context, added_cond_kwargs=added).sample
        out.square().mean().backward()
    finally:
        unet.disable_gradient_checkpointing()
        unet.eval()
    for name, param in network.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_file_round_trip_keys_shapes_values_and_metadata(unet, network, tmp_path):
    randomize_up(network)
    path = tmp_path / "lllite.safetensors"
    network.save_weights(path, torch.float16, {"modelspec.architecture": "stable-diffusion-xl-v1-base/control-net-lllite"})
    saved = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert all(v.dtype == torch.float16 for v in saved.values())
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    network.restore()
    loaded = lllite.create_network_from_weights(unet, path)
    assert (loaded.cond_emb_dim, loaded.mlp_dim) == (8, 6)
    assert [m.lllite_name for m in loaded.unet_modules] == [m.lllite_name for m in network.unet_modules]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved[key].float()), key
    loaded.apply_to()
    try:
        loaded.set_cond_image(control_image())
        out_loaded = run_unet(unet, unet_inputs())
    finally:
        loaded.restore()
    network.load_state_dict({k: v.float() for k, v in saved.items()})
    network.apply_to()
    network.set_cond_image(control_image())
    torch.testing.assert_close(run_unet(unet, unet_inputs()), out_loaded)


def test_bad_files_are_one_line_errors(unet, network, tmp_path):
    state = network.state_dict()
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora))
    with pytest.raises(lllite.LLLiteError, match="not a ControlNet-LLLite file"):
        lllite.create_network_from_weights(unet, lora)
    foreign = tmp_path / "foreign.safetensors"
    save_file({k.replace("input_blocks_3", "input_blocks_7"): v.contiguous() for k, v in state.items()}, str(foreign))
    with pytest.raises(lllite.LLLiteError, match="name no Linear layer"):
        lllite.create_network_from_weights(unet, foreign)
    other = lllite.create_network(unet, cond_emb_dim=8, mlp_dim=4)
    with pytest.raises(lllite.LLLiteError, match="shape"):
        other.load_state_dict_checked(state, "x.safetensors")
    sd15 = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16)
    with pytest.raises(lllite.LLLiteError, match="SDXL"):
        lllite.create_network(sd15)


def sdxl_unet_on_meta() -> UNet2DConditionModel:
    """The SDXL base U-Net (SGM config) with shapes only."""
    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )


def expected_full_size_keys(cond_emb_dim: int, mlp_dim: int) -> dict[str, list[int]]:
    """The key list the reference's target rules give on SDXL base, written out from the architecture.

    SDXL has transformers at levels 1 (640 wide, 2 blocks per attention; SGM input_blocks 4 and 5)
    and 2 (1280 wide, 10 blocks; input_blocks 7 and 8), and 10 blocks in the middle block. The
    reference adapts attn1 to_q/to_k/to_v and attn2 to_q there and skips the output blocks:
    (2*2 + 2*10 + 10) blocks x 4 = 136 modules. Level 1 embeds the control image with two convs
    (depth 2), level 2 and the middle with three (depth 3); every module has down/mid/up.
    """
    half = cond_emb_dim // 2
    places = [("input_blocks_4_1", 2, 640, 2), ("input_blocks_5_1", 2, 640, 2), ("input_blocks_7_1", 10, 1280, 3),
              ("input_blocks_8_1", 10, 1280, 3), ("middle_block_1", 10, 1280, 3)]
    keys: dict[str, list[int]] = {}
    for block, count, width, depth in places:
        for k in range(count):
            for layer in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q"):
                name = f"lllite_unet_{block}_transformer_blocks_{k}_{layer}"
                convs = [[half, 3, 4, 4]] + ([[cond_emb_dim, half, 4, 4]] if depth == 2 else
                                             [[half, half, 4, 4], [cond_emb_dim, half, 2, 2]])
                for i, shape in enumerate(convs):
                    keys[f"{name}.conditioning1.{2 * i}.weight"] = shape
                    keys[f"{name}.conditioning1.{2 * i}.bias"] = [shape[0]]
                for part, shape in (("down", [mlp_dim, width]), ("mid", [mlp_dim, mlp_dim + cond_emb_dim]),
                                    ("up", [width, mlp_dim])):
                    keys[f"{name}.{part}.0.weight"] = shape
                    keys[f"{name}.{part}.0.bias"] = [shape[0]]
    return keys


def test_full_size_sdxl_key_list_on_meta():
    network = lllite.create_network(sdxl_unet_on_meta(), cond_emb_dim=32, mlp_dim=64)  # the reference's canny dims
    actual = {k: list(v.shape) for k, v in network.state_dict().items()}
    expected = expected_full_size_keys(32, 64)
    assert len(network.unet_modules) == 136
    assert len(expected) == 16 * 10 + 120 * 12 == 1600
    assert sorted(actual.keys() - expected.keys()) == [] and sorted(expected.keys() - actual.keys()) == []
    assert actual == expected
    # the dims a loader reads back from the tensors
    assert lllite.lllite_dims(network.state_dict()) == (32, 64)
    # and a network built from that key list (any file with these keys) has the same modules and depths
    from_keys = lllite.create_network_from_weights(sdxl_unet_on_meta(), weights_sd=network.state_dict())
    assert [(m.lllite_name, m.depth) for m in from_keys.unet_modules] == \
           [(m.lllite_name, m.depth) for m in network.unet_modules]


# --- sdxl_train_control_net_lllite.py end to end ----------------------------------------------------

SCRIPT = "sdxl_train_control_net_lllite.py"
SIZE = 32
CAPTION = "a white half"
BASE_STEPS = 150  # fitting the base U-Net (in process)
LLLITE_STEPS = 80


def halves(side: str, split: int) -> Image.Image:
    """White on the ``side`` ('l'/'r') of column ``split``, black elsewhere: image and control image alike."""
    image = Image.new("RGB", (SIZE, SIZE), (15, 15, 15))
    box = (0, 0, split, SIZE) if side == "l" else (split, 0, SIZE, SIZE)
    ImageDraw.Draw(image).rectangle(box, fill=(245, 245, 245))
    return image


def train_side_blind_base(path, images: list[Image.Image], steps: int = 200) -> None:
    """A tiny SDXL model (the demo model's trained VAE, so pixels mean something) whose U-Net is fitted
    to ``images`` under one caption: it draws white halves but cannot know which side; v-prediction,
    whose loss at high noise is the clean image's, where the side is decided."""
    from diffusers import DDPMScheduler

    from library.demo.demo_model import DEMO_MODEL
    from library.demo.tiny_sd import write_single_file
    from library.demo.tiny_sdxl import build_tiny_sdxl
    from library.families.sdxl.generation import encode_prompts_sdxl
    from library.families.sdxl.loading import load_sdxl_models

    ldm = {k: v for k, v in build_tiny_sdxl(0).ldm.items() if not k.startswith("first_stage_model.")}
    ldm.update({k: v for k, v in load_file(str(DEMO_MODEL)).items() if k.startswith("first_stage_model.")})
    write_single_file(path, ldm, "safetensors")
    models = load_sdxl_models(path)
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images])
    with torch.no_grad():
        latents = models.vae.encode(pixels * 2 - 1).latent_dist.mean * 0.13025
        text = encode_prompts_sdxl(models.tokenizers, models.text_encoders, [CAPTION] * len(images),
                                   max_embeddings_multiples=1)
    added = {**text.unet_kwargs["added_cond_kwargs"],
             "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * len(images), dtype=torch.float32)}
    abar = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    unet, g = models.unet.train(), torch.Generator().manual_seed(5)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    for _ in range(steps):
        t = torch.randint(0, 1000, (len(images),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, text.hidden_states, added_cond_kwargs=added).sample
        loss = (pred - (a.sqrt() * noise - (1 - a).sqrt() * latents)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file({k: v.contiguous() for k, v in models.ldm_state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lllite_run")
    (root / "img").mkdir()
    (root / "cond").mkdir()
    images = []
    for i in range(8):
        image = halves("lr"[i % 2], SIZE // 2 - 2 + i // 2)
        image.save(root / "img" / f"{i:02d}.png")
        image.save(root / "cond" / f"{i:02d}.png")
        (root / "img" / f"{i:02d}.txt").write_text(CAPTION, encoding="utf-8")
        images.append(image)
    for side in "lr":
        halves(side, SIZE // 2).save(root / f"guide_{side}.png")
    train_side_blind_base(root / "base.safetensors", images, steps=BASE_STEPS)
    prompts = root / "prompts.txt"
    prompts.write_text(f"{CAPTION} --w {SIZE} --h {SIZE} --s 4 --d 1 --l 1 --cn {root / 'guide_l.png'}\n")
    args = base_train_args(root / "base.safetensors", root / "out", network_module=None, network_alpha=None,
                           network_dim=16, cond_emb_dim=8, output_name="lllite", train_data_dir=root / "img",
                           conditioning_data_dir=root / "cond", caption_extension=".txt", resolution=SIZE,
                           train_batch_size=8, max_train_steps=LLLITE_STEPS, learning_rate=5e-3,
                           cache_latents=True, v_parameterization=True, logging_dir=root / "logs",
                           save_every_n_steps=LLLITE_STEPS // 2, sample_prompts=prompts,
                           sample_every_n_steps=LLLITE_STEPS)
    run_script(SCRIPT, args)
    return root


@pytest.mark.slow
def test_lllite_run_writes_the_file_format_and_its_loss_falls(trained, unet):
    out = trained / "out"
    half = LLLITE_STEPS // 2
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [f"lllite-step{half:08d}.safetensors",
                                                                    f"lllite-step{LLLITE_STEPS:08d}.safetensors",
                                                                    "lllite.safetensors"]
    saved = load_file(str(out / "lllite.safetensors"))
    expected = lllite.create_network(unet, cond_emb_dim=8, mlp_dim=16).state_dict()  # same U-Net architecture
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert max(saved[k].abs().max().item() for k in saved if ".up.0." in k) > 0  # trained away from zero
    with safe_open(str(out / "lllite.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    assert (metadata["ss_network_dim"], metadata["ss_cond_emb_dim"], metadata["ss_steps"]) == ("16", "8", str(LLLITE_STEPS))
    assert "ss_network_alpha" not in metadata and "ss_network_module" not in metadata
    assert len(list((out / "sample").glob(f"lllite_{LLLITE_STEPS:06d}_00_*.png"))) == 1  # the --cn preview
    events = tensorboard_events(trained / "logs")
    epochs = [e.value for e in events.Scalars("loss/epoch_average")]
    assert len(epochs) == LLLITE_STEPS
    first, last = np.mean(epochs[:10]), np.mean(epochs[-10:])
    assert last < 0.75 * first, (first, last)
    assert all(e.value == pytest.approx(5e-3) for e in events.Scalars("lr/lllite"))


def side_margin(paths, side: str) -> float:
    """How much closer the images are to the half-white target of ``side`` than to the other side's
    (mean absolute pixel difference, 0..1): positive = they show ``side``."""
    target = {s: np.asarray(halves(s, SIZE // 2), dtype=np.float32) / 255 for s in "lr"}
    other = "r" if side == "l" else "l"
    pictures = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths]
    return float(np.mean([np.abs(p - target[other]).mean() - np.abs(p - target[side]).mean() for p in pictures]))


@pytest.mark.slow
def test_trained_lllite_draws_the_side_its_control_image_shows(trained):
    from library.generation.cli import setup_parser, validate_args
    from library.generation.runner import load_generator, run

    def generate(out, *extra):
        parser = setup_parser()
        args = parser.parse_args(["--ckpt", str(trained / "base.safetensors"), "--sdxl", "--v_parameterization",
                                  "--outdir", str(trained / out), "--W", str(SIZE), "--H", str(SIZE), "--steps", "12",
                                  "--sampler", "euler", "--scale", "1", "--seed", "3", "--images_per_prompt", "8",
                                  "--batch_size", "8", "--prompt", CAPTION, "--console_log_simple",
                                  *map(str, extra)])
        validate_args(parser, args)
        return run(args, load_generator(args, torch.device("cpu")))

    plain = generate("plain")
    for side in "lr":
        controlled = generate(f"control_{side}", "--control_net_lllite_models", trained / "out" / "lllite.safetensors",
                              "--guide_image_path", trained / f"guide_{side}.png")
        before, after = side_margin(plain, side), side_margin(controlled, side)
        # the same 8 seeds: without control they lean to one side or split; with it they show the guide's
        # side (on the side the base model already favours the gain is smaller: ~0.18 with 1 thread)
        print(f"side {side}: margin without control {before:.3f}, with control {after:.3f}")
        assert after > 0.3 and after > before + 0.12, (side, before, after)


@pytest.mark.slow
def test_resume_continues_to_identical_weights(tmp_path, tiny_sdxl_ckpt):
    for folder in ("img", "cond"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        halves("lr"[i % 2], 12 + 2 * i).save(tmp_path / "img" / f"{i}.png")
        halves("lr"[i % 2], 12 + 2 * i).save(tmp_path / "cond" / f"{i}.png")
        (tmp_path / "img" / f"{i}.txt").write_text(CAPTION, encoding="utf-8")
    common = dict(network_module=None, network_alpha=None, network_dim=4, cond_emb_dim=4, output_name="lllite",
                  train_data_dir=tmp_path / "img", conditioning_data_dir=tmp_path / "cond", caption_extension=".txt",
                  resolution=SIZE, train_batch_size=2, max_train_steps=4, save_every_n_steps=2, save_state=True,
                  network_dropout=0.1, learning_rate=1e-2)
    run_script(SCRIPT, base_train_args(tiny_sdxl_ckpt, tmp_path / "full", **common))
    state = tmp_path / "full" / "lllite-step00000002-state"
    run_script(SCRIPT, base_train_args(tiny_sdxl_ckpt, tmp_path / "resumed", resume=state, **common))
    a = load_file(str(tmp_path / "full" / "lllite.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "lllite.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mid = load_file(str(tmp_path / "full" / "lllite-step00000002.safetensors"))
    assert any(not torch.equal(mid[k], a[k]) for k in a)  # the weights moved after the resume point


def test_flag_errors_are_one_line(tmp_path, tiny_sdxl_ckpt):
    import sdxl_train_control_net_lllite as script

    (tmp_path / "img").mkdir()
    halves("l", 16).save(tmp_path / "img" / "0.png")
    common = dict(network_module=None, network_alpha=None, train_data_dir=tmp_path / "img", max_train_steps=1)
    # caught before any model loads (in process: the same exit a user sees)
    with pytest.raises(SystemExit, match="--conditioning_data_dir is required"):
        script.main(base_train_args(tiny_sdxl_ckpt, tmp_path / "o", **common))
    with pytest.raises(SystemExit, match="--cond_emb_dim must be even"):
        script.main(base_train_args(tiny_sdxl_ckpt, tmp_path / "o", cond_emb_dim=5,
                                    conditioning_data_dir=tmp_path / "img", **common))
    bad = run_script(SCRIPT, ["--network_module", "networks.lora"], expect_ok=False)
    assert bad.returncode == 2 and "--network_module" in bad.stderr  # not a flag of this script
