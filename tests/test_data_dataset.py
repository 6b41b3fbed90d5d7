"""Datasets and the dataset group: batches, reg balancing, determinism, workers, errors, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.collate import collate_batch
from library.data.errors import DatasetError
from library.dataset_config import build_dataset_group
from tests.data_helpers import parse, write_folder, write_image
from tests.reference import load_reference




def group_for(tmp_path: Path, **flags):
    flags.setdefault("resolution", 64)
    flags.setdefault("seed", 7)
    return build_dataset_group(parse(train_data_dir=tmp_path / "train", **flags))[0]


def test_reg_images_balanced_round_robin(tmp_path):
    write_folder(tmp_path / "train" / "5_sks", [(64, 64)] * 2)
    write_folder(tmp_path / "reg" / "1_dog", [(64, 64)] * 3)
    group = group_for(tmp_path, reg_data_dir=tmp_path / "reg")
    reg = sorted((i for i in group.images() if i.is_reg), key=lambda i: i.image_key)
    # 3 reg images take 3 of the 10 training slots; the other 7 go round-robin: +3, +2, +2
    assert [i.num_repeats for i in reg] == [4, 3, 3]
    assert (group.num_train_images, group.num_reg_images) == (10, 3)


def test_surplus_reg_images_unused(tmp_path):
    write_folder(tmp_path / "train" / "5_sks", [(64, 64)] * 2)
    write_folder(tmp_path / "reg" / "1_dog", [(64, 64)] * 20)
    group = group_for(tmp_path, reg_data_dir=tmp_path / "reg")
    reg = [i for i in group.images() if i.is_reg]
    assert len(reg) == 10 and all(i.num_repeats == 1 for i in reg) and group.num_reg_images == 20


def test_batches_within_buckets_and_contents(tmp_path):
    train = tmp_path / "train" / "1_sks"
    write_folder(train, [(64, 64)] * 3 + [(192, 64)], ["a, b", "c", None, "wide"])
    reg = tmp_path / "reg" / "3_dog"
    write_folder(reg, [(64, 64)])
    group = group_for(tmp_path, reg_data_dir=tmp_path / "reg", train_batch_size=2, enable_bucket=True,
                      min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, prior_loss_weight=0.25)
    sizes = sorted(len(group[i]["captions"]) for i in range(len(group)))
    # 4 training slots, so the reg image's 3 repeats are raised to 4. Bucket 64x64: 3 training +
    # 4 reg = 7 items -> batches of 2, 2, 2, 1; bucket 96x32 (the 3:1 image): one batch of 1
    assert sizes == [1, 1, 2, 2, 2]
    for i in range(len(group)):
        b = group[i]
        n = len(b["captions"])
        h, w = b["target_sizes_hw"][0].tolist()
        assert b["images"].shape == (n, 3, h, w) and b["images"].dtype == torch.float32
        assert b["images"].min() >= -1 and b["images"].max() <= 1 and b["latents"] is None
        assert (b["target_sizes_hw"] == b["target_sizes_hw"][0]).all()  # one bucket per batch
        expected_w = [0.25 if "/reg/" in k else 1.0 for k in b["image_keys"]]
        assert b["loss_weights"].tolist() == expected_w
        assert b["network_multipliers"].tolist() == [1.0] * n and b["custom_attributes"] == [{}] * n
        assert b["alpha_masks"] is None and b["flippeds"] == [False] * n
        for key, caption in zip(b["image_keys"], b["captions"]):
            if key.endswith("img2.png") and "/reg/" not in key:
                assert caption == "sks"  # no caption file -> class tokens from the folder name
            if "/reg/" in key:
                assert caption == "dog"
    wide = next(group[i] for i in range(len(group)) if group[i]["target_sizes_hw"][0].tolist() == [32, 96])
    assert wide["original_sizes_hw"].tolist() == [[64, 192]] and wide["captions"] == ["wide"]
    assert collate_batch([wide]) is wide


def test_pixels_match_file_and_flip(tmp_path):
    path = write_image(tmp_path / "train" / "1_x" / "a.png", (64, 64), seed=3)
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
    plain = group_for(tmp_path)[0]
    assert torch.allclose(plain["images"][0], pixels)
    flipping = group_for(tmp_path, flip_aug=True)
    seen = set()
    for epoch in range(1, 9):
        flipping.set_current_epoch(epoch)
        b = flipping[0]
        expected = torch.flip(pixels, dims=[2]) if b["flippeds"][0] else pixels
        assert torch.allclose(b["images"][0], expected)
        seen.add(b["flippeds"][0])
    assert seen == {True, False}


def test_crop_bookkeeping_with_flip(tmp_path):
    write_image(tmp_path / "train" / "1_x" / "a.png", (70, 100))
    group = group_for(tmp_path, flip_aug=True)
    for epoch in range(1, 9):
        group.set_current_epoch(epoch)
        b = group[0]
        # bucket 64x64, AR 0.7: fitted width 44.8 -> left 9, right 54; flipped left = 64 - 54
        assert b["crop_top_lefts"].tolist() == [[0, 10 if b["flippeds"][0] else 9]]
        assert b["original_sizes_hw"].tolist() == [[100, 70]]


def test_same_epoch_replays_other_epochs_differ(tmp_path):
    tags = ", ".join(f"t{i}" for i in range(12))
    write_folder(tmp_path / "train" / "2_x", [(64, 64)] * 6, [tags] * 6)
    flags = dict(shuffle_caption=True, flip_aug=True, train_batch_size=2)
    first, second = group_for(tmp_path, **flags), group_for(tmp_path, **flags)
    second.set_current_epoch(3)
    later = [second[i] for i in range(len(second))]
    second.set_current_epoch(1)
    for i in range(len(first)):
        a, b = first[i], second[i]
        assert a["captions"] == b["captions"] and a["image_keys"] == b["image_keys"] and a["flippeds"] == b["flippeds"]
        assert torch.equal(a["images"], b["images"])
    assert [b["captions"] for b in later] != [first[i]["captions"] for i in range(len(first))]
    other_seed = group_for(tmp_path, seed=8, **flags)
    assert [other_seed[i]["captions"] for i in range(len(first))] != [first[i]["captions"] for i in range(len(first))]


def test_workers_see_current_epoch(tmp_path):
    tags = ", ".join(f"t{i}" for i in range(10))
    write_folder(tmp_path / "train" / "1_x", [(64, 64)] * 2, [tags] * 2)
    group = group_for(tmp_path, shuffle_caption=True)
    expected = {}
    for epoch in (1, 2):
        group.set_current_epoch(epoch)
        expected[epoch] = [group[i]["captions"] for i in range(len(group))]
    assert expected[1] != expected[2]
    loader = torch.utils.data.DataLoader(group, batch_size=1, shuffle=False, num_workers=1, persistent_workers=True,
                                         collate_fn=collate_batch)
    for epoch in (1, 2):
        group.set_current_epoch(epoch)
        assert [b["captions"] for b in loader] == expected[epoch]


def test_token_warmup_step_from_request(tmp_path):
    write_folder(tmp_path / "train" / "1_x", [(64, 64)], ["a, b, c, d, e"])
    group = group_for(tmp_path, token_warmup_min=1, token_warmup_step=4)
    assert group[(0, 0)]["captions"] == ["a"]
    assert group[(0, 2)]["captions"] == ["a, b, c"]
    group.set_current_step(10)
    assert group[0]["captions"] == ["a, b, c, d, e"]


def test_alpha_mask_and_tokenize(tmp_path):
    write_image(tmp_path / "train" / "1_x" / "a.png", (64, 64), alpha=True)
    group = group_for(tmp_path, alpha_mask=True)
    group.tokenize = lambda captions: torch.zeros(len(captions), 1, 77, dtype=torch.long)
    b = group[0]
    mask = b["alpha_masks"]
    assert mask.shape == (1, 64, 64) and mask[0, :, :32].eq(1).all() and mask[0, :, 32:].eq(0).all()
    assert b["input_ids"].shape == (1, 1, 77)


def test_corrupt_image_fails_at_build_naming_file(tmp_path):
    folder = tmp_path / "train" / "1_x"
    write_folder(folder, [(64, 64)])
    (folder / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        group_for(tmp_path)


@pytest.mark.parametrize("content, message", [(b"caf\xe9", "is not UTF-8"), (b"\n \n", "is empty")])
def test_bad_caption_fails_at_build_naming_file(tmp_path, content, message):
    folder = tmp_path / "train" / "1_x"
    write_folder(folder, [(64, 64)])
    (folder / "img0.caption").write_bytes(content)
    with pytest.raises(DatasetError, match=rf"img0\.caption {message}"):
        group_for(tmp_path)


def test_flat_metadata_matches_reference_formats(tmp_path):
    write_folder(tmp_path / "train" / "10_sks", [(64, 64), (64, 64), (96, 64)], ["sks, a red box", "sks, blue", None])
    group = group_for(tmp_path, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    md = group.metadata(parse(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128),
                        num_processes=2, gradient_accumulation_steps=3)
    reference = load_reference("lora_metadata_sd1_example.json")
    dataset_keys = {"ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_color_aug", "ss_flip_aug",
                    "ss_random_crop", "ss_shuffle_caption", "ss_enable_bucket", "ss_bucket_no_upscale",
                    "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_keep_tokens", "ss_dataset_dirs",
                    "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info"}
    assert set(md) == dataset_keys and dataset_keys <= set(reference)
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_resolution"] == "(64, 64)" and md["ss_total_batch_size"] == "6"
    assert md["ss_enable_bucket"] == "True" and md["ss_color_aug"] == "False" and md["ss_min_bucket_reso"] == "32"
    assert md["ss_dataset_dirs"] == '{"10_sks": {"n_repeats": 10, "img_count": 3}}'
    assert md["ss_reg_dataset_dirs"] == "{}"
    assert md["ss_tag_frequency"] == '{"10_sks": {"sks": 3, "a red box": 1, "blue": 1}}'
    info = json.loads(md["ss_bucket_info"])
    assert set(info) == set(json.loads(reference["ss_bucket_info"])) == {"buckets", "mean_img_ar_error"}
    # 96x64 (AR 1.5) is nearer to 64x64 (AR 1) than to 96x32 (AR 3): one bucket, 3 images x 10
    assert info["buckets"] == {"0": {"resolution": [64, 64], "count": 30}}
    assert info["mean_img_ar_error"] == pytest.approx(0.5 / 3)
    assert md["ss_bucket_info"] == json.dumps(info)  # json.dumps default separators, as the reference


def test_config_metadata_layout(tmp_path):
    write_folder(tmp_path / "a", [(64, 64)] * 2, ["x, y", "y"])
    write_folder(tmp_path / "r", [(64, 64)])
    cfg = {"datasets": [
        {"resolution": 64, "subsets": [{"image_dir": str(tmp_path / "a"), "num_repeats": 3, "class_tokens": "sks"},
                                       {"image_dir": str(tmp_path / "r"), "is_reg": True}]},
        {"resolution": 64, "subsets": [{"image_dir": str(tmp_path / "a")}]},
    ]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    group, _ = build_dataset_group(parse(dataset_config=path, seed=1))
    md = group.metadata(parse())
    assert set(md) == {"ss_datasets", "ss_tag_frequency", "ss_dataset_dirs"}
    datasets = json.loads(md["ss_datasets"])
    assert [d["num_train_images"] for d in datasets] == [6, 2] and datasets[0]["num_reg_images"] == 1
    first = datasets[0]
    assert first["is_dreambooth"] and first["resolution"] == [64, 64] and first["min_bucket_reso"] is None
    assert [s["image_dir"] for s in first["subsets"]] == ["a", "r"] and first["subsets"][1]["is_reg"]
    assert first["subsets"][0]["class_tokens"] == "sks" and first["subsets"][0]["img_count"] == 2
    # the same folder in two datasets gets a numbered name; reg folders are not listed
    assert json.loads(md["ss_dataset_dirs"]) == {"a": {"n_repeats": 3, "img_count": 2},
                                                 "a (2)": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(md["ss_tag_frequency"])["a"] == {"x": 1, "y": 2}
