"""Dataset config: schema, resolution order, CLI-only folders, error messages."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from library.data.errors import DatasetError
from library.data.params import DreamBoothSubsetParams, FineTuningSubsetParams
from library.dataset_config import (blueprints_from_cli, blueprints_from_config, build_dataset_group,
                                    load_config_file)
from tests.data_helpers import parse, write_folder


def write_toml(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


FULL_EXAMPLE = """
    [general]
    shuffle_caption = true
    caption_extension = ".txt"
    keep_tokens = 1
    keep_tokens_separator = "|||"
    secondary_separator = ";;;"
    enable_wildcard = true
    caption_prefix = "photo of"
    caption_suffix = "best"
    color_aug = false
    flip_aug = true
    face_crop_aug_range = [2.0, 4.0]
    random_crop = false
    token_warmup_min = 2
    token_warmup_step = 0.5
    caption_dropout_rate = 0.1
    caption_dropout_every_n_epochs = 3
    caption_tag_dropout_rate = 0.2
    caption_separator = ","
    class_tokens = "sks"
    cache_info = false
    resize_interpolation = "lanczos"
    custom_attributes = { diff_output_preservation = true }

    [[datasets]]
    resolution = [768, 512]
    batch_size = 4
    enable_bucket = true
    min_bucket_reso = 320
    max_bucket_reso = 1280
    bucket_reso_steps = 64
    bucket_no_upscale = true
    network_multiplier = 0.5
    validation_seed = 3
    validation_split = 0.1
    alpha_mask = true

      [[datasets.subsets]]
      image_dir = "IMG"
      num_repeats = 10
      is_reg = false

      [[datasets.subsets]]
      image_dir = "REG"
      is_reg = true
      alpha_mask = false
      resize_interpolation = "area"

    [[datasets]]
    resolution = 512

      [[datasets.subsets]]
      metadata_file = "meta.json"
      image_dir = "IMG"
"""


def test_schema_accepts_every_reference_key_and_resolves_typed_values(tmp_path):
    path = write_toml(tmp_path, FULL_EXAMPLE)
    blueprints = blueprints_from_config(load_config_file(path), parse(), source=str(path))
    db, ft = blueprints
    assert db.kind == "dreambooth" and ft.kind == "fine_tuning"
    assert db.resolution == (768, 512) and ft.resolution == (512, 512)
    assert (db.batch_size, db.enable_bucket, db.min_bucket_reso, db.max_bucket_reso) == (4, True, 320, 1280)
    assert db.bucket_no_upscale and db.network_multiplier == 0.5
    assert (db.validation_split, db.validation_seed) == (0.1, 3)
    img, reg = db.subsets
    assert isinstance(img, DreamBoothSubsetParams) and img.image_dir == Path("IMG")
    assert img.num_repeats == 10 and not img.is_reg and reg.is_reg
    assert img.alpha_mask and not reg.alpha_mask  # dataset value, overridden by the subset
    assert img.resize_interpolation == "lanczos" and reg.resize_interpolation == "area"
    assert img.face_crop_aug_range == (2.0, 4.0)
    assert img.custom_attributes == {"diff_output_preservation": True}
    assert (img.caption_extension, img.class_tokens, img.keep_tokens_separator) == (".txt", "sks", "|||")
    assert img.token_warmup_step == 0.5 and img.caption_dropout_every_n_epochs == 3
    (ft_subset,) = ft.subsets
    assert isinstance(ft_subset, FineTuningSubsetParams) and ft_subset.metadata_file == Path("meta.json")


def test_unknown_key_reports_path_and_suggestion(tmp_path):
    path = write_toml(tmp_path, """
        [[datasets]]
        resolution = 512
          [[datasets.subsets]]
          image_dir = "a"
          [[datasets.subsets]]
          image_dir = "b"
          num_repeat = 3
    """)
    with pytest.raises(DatasetError) as e:
        load_config_file(path)
    msg = str(e.value)
    assert "datasets[0].subsets[1].num_repeat" in msg and "did you mean 'num_repeats'" in msg
    assert str(path) in msg


def test_misplaced_and_mistyped_keys_say_where_they_belong(tmp_path):
    path = write_toml(tmp_path, """
        [general]
        alpha_mask = true
        [[datasets]]
        resolution = "512"
          [[datasets.subsets]]
          image_dir = "a"
          batch_size = 2
          flip_aug = "yes"
    """)
    with pytest.raises(DatasetError) as e:
        load_config_file(path)
    msg = str(e.value)
    assert "general.alpha_mask" in msg and "belongs in [[datasets]] or [[datasets.subsets]]" in msg
    assert "datasets[0].subsets[0].batch_size" in msg and "belongs in [general] or [[datasets]]" in msg
    assert "datasets[0].resolution" in msg and "[width, height]" in msg
    assert "datasets[0].subsets[0].flip_aug: expected bool (got 'yes')" in msg


def test_resolution_order_subset_dataset_general_cli(tmp_path):
    path = write_toml(tmp_path, """
        [general]
        keep_tokens = 2
        caption_prefix = "general"
        [[datasets]]
        resolution = 256
        keep_tokens = 3
          [[datasets.subsets]]
          image_dir = "a"
          keep_tokens = 4
          [[datasets.subsets]]
          image_dir = "b"
        [[datasets]]
        batch_size = 3
          [[datasets.subsets]]
          image_dir = "c"
    """)
    args = parse(keep_tokens=1, resolution="320,192", train_batch_size=5, dataset_repeats=7, caption_extention="txt")
    first, second = blueprints_from_config(load_config_file(path), args)
    a, b = first.subsets
    (c,) = second.subsets
    assert (a.keep_tokens, b.keep_tokens, c.keep_tokens) == (4, 3, 2)  # subset > dataset > general
    assert c.caption_prefix == "general"
    assert first.resolution == (256, 256) and second.resolution == (320, 192)  # dataset > CLI
    assert first.batch_size == 5 and second.batch_size == 3  # --train_batch_size fills batch_size
    assert a.num_repeats == 7  # --dataset_repeats fills num_repeats
    assert a.caption_extension == "txt"  # legacy --caption_extention
    # argparse defaults take part: they beat the built-in defaults
    args = parse(resolution=256)
    (only,) = blueprints_from_config({"datasets": [{"subsets": [{"image_dir": "x"}]}]}, args)
    assert only.subsets[0].caption_extension == ".caption" and only.min_bucket_reso == 256


def test_json_config_and_missing_resolution(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"datasets": [{"subsets": [{"image_dir": "x"}]}]}), encoding="utf-8")
    with pytest.raises(DatasetError, match="resolution is not set"):
        blueprints_from_config(load_config_file(path), parse())
    (bp,) = blueprints_from_config(load_config_file(path), parse(resolution=128))
    assert bp.resolution == (128, 128)


def test_dataset_kind_errors(tmp_path):
    mixed = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": "a"}, {"metadata_file": "m.json"}]}]}
    with pytest.raises(DatasetError, match="separate"):
        blueprints_from_config(load_config_file(_json(tmp_path, mixed)), parse())
    no_dir = {"datasets": [{"resolution": 64, "subsets": [{"num_repeats": 2}]}]}
    with pytest.raises(DatasetError, match=r"subsets\[0\]: image_dir is required"):
        blueprints_from_config(load_config_file(_json(tmp_path, no_dir)), parse())


def _json(tmp_path: Path, data) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_cli_only_folders(tmp_path):
    train = tmp_path / "train"
    write_folder(train / "10_sks dog", [(64, 64)] * 2)
    write_folder(train / "3_cat_toy", [(64, 64)])
    write_folder(train / "notes", [(64, 64)])  # not <repeats>_<name>: skipped
    write_folder(tmp_path / "reg" / "1_dog", [(64, 64)] * 3)
    (bp,) = blueprints_from_cli(parse(train_data_dir=train, reg_data_dir=tmp_path / "reg", resolution=64))
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in bp.subsets]
    assert got == [("10_sks dog", 10, "sks dog", False), ("3_cat_toy", 3, "cat_toy", False), ("1_dog", 1, "dog", True)]


def test_no_data_found_explains_convention(tmp_path):
    train = tmp_path / "train"
    write_folder(train / "images", [(64, 64)])
    write_folder(train, [(64, 64)], prefix="loose")
    with pytest.raises(DatasetError) as e:
        build_dataset_group(parse(train_data_dir=train, resolution=64))
    msg = str(e.value)
    assert msg.startswith("No data found in --train_data_dir")
    assert "<repeats>_<name>" in msg and "'images'" in msg and "1 image(s) lie directly" in msg


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset_group(parse(train_data_dir=tmp_path / "nope", resolution=64))
    cfg = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(tmp_path / "missing")}]}]}
    with pytest.raises(DatasetError, match=r"datasets\[0\]\.subsets\[0\]: image_dir .*missing does not exist"):
        build_dataset_group(parse(dataset_config=_json(tmp_path, cfg)))


def test_in_json_fine_tuning(tmp_path):
    write_folder(tmp_path / "imgs", [(64, 64), (96, 64)])
    meta = {"img0.png": {"caption": "a cat", "tags": "cute, small"}, "img1": {"tags": "dog"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    group, val = build_dataset_group(parse(train_data_dir=tmp_path / "imgs", in_json=tmp_path / "meta.json",
                                           resolution=64, dataset_repeats=2, seed=1))
    assert val is None and group.num_train_images == 4
    captions = sorted((i.image_key, i.caption) for i in group.images())
    assert captions == [("img0.png", "a cat,cute, small"), ("img1", "dog")]


def test_validation_split_is_disjoint_and_complete(tmp_path):
    write_folder(tmp_path / "img", [(64, 64)] * 10)
    cfg = {"datasets": [{"resolution": 64, "validation_split": 0.3, "validation_seed": 5,
                         "subsets": [{"image_dir": str(tmp_path / "img"), "num_repeats": 2}]}]}
    train, val = build_dataset_group(parse(dataset_config=_json(tmp_path, cfg), seed=1))
    train_keys = {i.image_key for i in train.images()}
    val_keys = {i.image_key for i in val.images()}
    assert len(train_keys) == 7 and len(val_keys) == 3 and not train_keys & val_keys
    assert all(i.num_repeats == 1 for i in val.images()) and train.num_train_images == 14


def test_bucket_reso_steps_check(tmp_path):
    write_folder(tmp_path / "1_a", [(64, 64)])
    args = parse(train_data_dir=tmp_path, resolution=64, bucket_reso_steps=32, enable_bucket=True, min_bucket_reso=32)
    group, _ = build_dataset_group(args)
    group.verify_bucket_reso_steps(32)
    with pytest.raises(DatasetError, match="multiple of 64"):
        group.verify_bucket_reso_steps(64)


def test_dataset_class(tmp_path, monkeypatch):
    module = tmp_path / "my_ds_mod.py"
    module.write_text("from library.data.custom import MinimalDataset\n"
                      "class DS(MinimalDataset):\n"
                      "    def __len__(self): return 3\n"
                      "    def __getitem__(self, i): return {'captions': ['x']}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    group, val = build_dataset_group(parse(dataset_class="my_ds_mod.DS"), tokenize=len)
    assert len(group) == 3 and val is None and group.tokenize is len and group.metadata(None) == {}
    group.set_current_epoch(4)
    assert group.progress.epoch == 4
    with pytest.raises(DatasetError, match="has no 'Nope'"):
        build_dataset_group(parse(dataset_class="my_ds_mod.Nope"))
    sys.modules.pop("my_ds_mod", None)
