"""The finetune/ metadata workflow: merge captions / tags, clean, bucket + cache latents, then train-side reading.

Small images (64 px shapes, one 120x40 strip) and the tiny SD1 VAE; the scripts run in-process through
their ``main(argv)`` (the same parser users hit), ``--help`` as subprocesses by path.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import clean_captions_and_tags as clean
from finetune import merge_captions_to_metadata as merge_captions
from finetune import merge_dd_tags_to_metadata as merge_tags
from finetune import prepare_buckets_latents as prepare
from finetune.metadata_io import image_key
from library.data.images import IMAGE_EXTENSIONS
from library.demo.shapes import shape_image, write_shapes_folder
from library.dataset_config import build_dataset_group
from tests.data_helpers import parse

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["merge_captions_to_metadata.py", "merge_dd_tags_to_metadata.py", "clean_captions_and_tags.py",
           "prepare_buckets_latents.py"]
# Bucketing for 64 px images: buckets (64,64), (96,32), (32,96), (128,32), (32,128).
BUCKET_FLAGS = ["--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                "--bucket_reso_steps", "32"]
TRAIN_BUCKET_FLAGS = {"resolution": "64,64", "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
                      "bucket_reso_steps": 32}


@pytest.fixture(autouse=True)
def keep_test_logging(monkeypatch):
    """``main`` configures the root logger for users; in tests that would remove caplog's handler."""
    for module in (merge_captions, merge_tags, clean, prepare):
        monkeypatch.setattr(module, "setup_logging", lambda *args, **kwargs: None)


def load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def train_dir(tmp_path) -> Path:
    """img000..img002 (64x64) with .caption files ('a <colour> <shape> on a <colour> background')."""
    folder = tmp_path / "train"
    write_shapes_folder(folder, 3, seed=1, caption_extension=".caption")
    return folder


def captions_of(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.caption"))}


# ------------------------------------------------------------------------------ merge scripts


def test_merge_captions_exact_json_and_missing_caption_skipped(train_dir, tmp_path, caplog):
    expected = captions_of(train_dir)
    shape_image("circle", "red", "blue").save(train_dir / "nocap.png")
    (train_dir / "notes.txt").write_text("not an image", encoding="utf-8")
    (train_dir / "multi.jpg").write_bytes((train_dir / "img000.png").read_bytes())  # any supported extension
    (train_dir / "multi.caption").write_bytes("\ufeff  first line \n\n second line\n".encode("utf-8"))
    (train_dir / "blank.webp").write_bytes((train_dir / "img000.png").read_bytes())
    (train_dir / "blank.caption").write_text(" \n", encoding="utf-8")
    out = tmp_path / "meta_cap.json"
    with caplog.at_level(logging.WARNING):
        merge_captions.main([str(train_dir), str(out)])
    assert load_json(out) == {**{k: {"caption": v} for k, v in expected.items()},
                              "multi": {"caption": "first line\nsecond line"}}
    assert list(load_json(out)) == ["img000", "img001", "img002", "multi"]  # listing order
    assert "nocap.caption" in caplog.text and "blank.caption" in caplog.text
    assert out.read_text(encoding="utf-8").startswith('{\n  "img000": {\n    "caption": ')


def test_merge_non_utf8_caption_names_the_file(train_dir, tmp_path):
    (train_dir / "img001.caption").write_bytes(b"caf\xe9 latte")  # latin-1
    with pytest.raises(SystemExit) as err:
        merge_captions.main([str(train_dir), str(tmp_path / "out.json")])
    message = str(err.value)
    assert "img001.caption" in message and "not UTF-8" in message and "offset 3" in message
    assert not (tmp_path / "out.json").exists()


def test_merge_tags_updates_in_json_keeping_other_fields(train_dir, tmp_path):
    for i, tags in enumerate(["1girl, solo", "dog", "cat, tree"]):
        (train_dir / f"img00{i}.txt").write_text(tags + "\n", encoding="utf-8")
    in_json = tmp_path / "meta_cap.json"
    original = {"img000": {"caption": "old caption", "image_size": [64, 64]},
                "gone": {"caption": "image deleted since", "tags": "x"}}
    in_json.write_text(json.dumps(original), encoding="utf-8")
    out = tmp_path / "meta_cap_dd.json"
    merge_tags.main([str(train_dir), str(out), "--in_json", str(in_json)])
    assert load_json(out) == {"img000": {"caption": "old caption", "image_size": [64, 64], "tags": "1girl, solo"},
                              "gone": {"caption": "image deleted since", "tags": "x"},
                              "img001": {"tags": "dog"}, "img002": {"tags": "cat, tree"}}
    assert load_json(in_json) == original  # the input is never rewritten
    # Captions replace the caption field only; tags stay.
    merge_captions.main([str(train_dir), str(tmp_path / "both.json"), "--in_json", str(out)])
    both = load_json(tmp_path / "both.json")
    assert both["img000"] == {"caption": captions_of(train_dir)["img000"], "image_size": [64, 64],
                              "tags": "1girl, solo"}
    assert both["gone"] == original["gone"]


def test_existing_out_json_is_updated_without_in_json(train_dir, tmp_path):
    (train_dir / "img000.tags").write_text("red, circle", encoding="utf-8")
    out = tmp_path / "meta.json"
    merge_captions.main([str(train_dir), str(out)])
    merge_tags.main([str(train_dir), str(out), "--caption_extension", "tags"])  # dot added, as the dataset does
    meta = load_json(out)
    assert meta["img000"] == {"caption": captions_of(train_dir)["img000"], "tags": "red, circle"}
    assert meta["img001"] == {"caption": captions_of(train_dir)["img001"]}


def test_caption_extension_legacy_spelling(train_dir, tmp_path):
    (train_dir / "img002.cap").write_text("x", encoding="utf-8")
    out = tmp_path / "m.json"
    merge_captions.main([str(train_dir), str(out), "--caption_extention", ".cap"])
    assert load_json(out) == {"img002": {"caption": "x"}}


def test_keys_full_path_and_recursive_resolve_in_the_dataset(train_dir, tmp_path):
    sub = train_dir / "sub" / "deeper"
    write_shapes_folder(sub, 1, seed=5, caption_extension=".caption")  # sub/deeper/img000.png
    top = captions_of(train_dir)
    deep = captions_of(sub)["img000"]

    flat = tmp_path / "flat.json"
    merge_captions.main([str(train_dir), str(flat)])
    assert sorted(load_json(flat)) == ["img000", "img001", "img002"]  # sub-folders need --recursive

    rec = tmp_path / "rec.json"
    merge_captions.main([str(train_dir), str(rec), "--recursive"])
    assert load_json(rec) == {**{k: {"caption": v} for k, v in top.items()}, "sub/deeper/img000": {"caption": deep}}

    full = tmp_path / "full.json"
    merge_captions.main([str(train_dir), str(full), "--recursive", "--full_path"])
    expected_keys = [os.path.abspath(train_dir / f"img00{i}.png") for i in range(3)]
    expected_keys.append(os.path.abspath(sub / "img000.png"))
    assert list(load_json(full)) == expected_keys
    assert load_json(full)[expected_keys[-1]] == {"caption": deep}

    for meta in (rec, full):  # the dataset finds every image from these keys
        group = build_dataset_group(parse(in_json=meta, train_data_dir=train_dir, resolution=64, seed=1))[0]
        paths = sorted(str(i.path) for i in group.images())
        assert paths == sorted(str(p) for p in [*(train_dir / f"img00{i}.png" for i in range(3)), sub / "img000.png"])
        deep_info = next(i for i in group.images() if i.path.parent == sub)
        assert deep_info.caption == deep


def test_image_key_forms(tmp_path):
    image = tmp_path / "d" / "s" / "x.v2.PNG"
    assert image_key(image, tmp_path / "d") == "x.v2"
    assert image_key(image, tmp_path / "d", recursive=True) == "s/x.v2"
    assert image_key(image, tmp_path / "d", full_path=True) == os.path.abspath(image)


def test_same_stem_two_extensions_is_an_error(train_dir, tmp_path):
    (train_dir / "img000.jpg").write_bytes((train_dir / "img000.png").read_bytes())
    with pytest.raises(SystemExit) as err:
        merge_captions.main([str(train_dir), str(tmp_path / "o.json")])
    assert "img000.jpg" in str(err.value) and "img000.png" in str(err.value) and "--full_path" in str(err.value)
    merge_captions.main([str(train_dir), str(tmp_path / "o.json"), "--full_path"])  # no clash with full paths
    assert len(load_json(tmp_path / "o.json")) == 4
    # ... but both images would be cached as img000.npz: refused before any model is loaded
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    with pytest.raises(SystemExit, match="would both be cached as .*img000.npz"):
        prepare.main([str(train_dir), str(tmp_path / "o.json"), str(tmp_path / "l.json"), str(model), "--full_path"])


def test_bad_inputs_give_one_line_errors(train_dir, tmp_path):
    with pytest.raises(SystemExit, match="does not exist or is not a folder"):
        merge_captions.main([str(tmp_path / "nowhere"), str(tmp_path / "o.json")])
    with pytest.raises(SystemExit, match="does not exist"):
        merge_tags.main([str(train_dir), str(tmp_path / "o.json"), "--in_json", str(tmp_path / "missing.json")])
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": {"caption": "x"},}', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"not valid JSON \(line 1"):
        merge_tags.main([str(train_dir), str(tmp_path / "o.json"), "--in_json", str(broken)])
    broken.write_text('{"a": "just a string"}', encoding="utf-8")
    with pytest.raises(SystemExit, match="entry 'a' is a JSON str"):
        clean.main([str(broken), str(tmp_path / "o.json")])


def test_images_listed_with_every_extension_the_dataset_accepts(tmp_path):
    from finetune.metadata_io import list_images

    names = [f"x{i}{ext}" for i, ext in enumerate(IMAGE_EXTENSIONS)] + [f"u{ext.upper()}" for ext in IMAGE_EXTENSIONS]
    for name in [*names, "notes.txt", "x.npz", "cap.caption"]:
        (tmp_path / name).write_bytes(b"")  # listing looks at names only
    (tmp_path / "folder.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == sorted(names)


# ------------------------------------------------------------------------------ cleaning


@pytest.mark.parametrize("raw, cleaned", [
    # rule 1: whitespace runs (tab, NBSP, ideographic space) -> one space, lines stripped, blank lines dropped
    ("  a\tred \u00a0 cat\u3000sitting  ", "a red cat sitting"),
    ("first line\n\n   \n second  line ", "first line\nsecond line"),
    # rule 2: no space before commas, one comma of a run, none at the ends
    ("a cat , sitting ,, on a mat ,", "a cat, sitting, on a mat"),
    (", a cat", "a cat"),
    ("a cat , , dog", "a cat, dog"),
    # rule 3: leading "a/an/the picture/photo/photograph/image of", any case, repeated, only when text follows
    ("A photo of a cat", "a cat"),
    ("an IMAGE of   two dogs", "two dogs"),
    ("the photograph of a photo of a bird", "a bird"),
    ("a picture of", "a picture of"),
    ("a painting of a cat", "a painting of a cat"),  # only the four neutral nouns
    ("cat in a photo of a room", "cat in a photo of a room"),  # only at the start
    ("a photo of a cat\na picture of a dog", "a cat\na dog"),  # per line
    ("   ", ""),
])
def test_caption_rules(raw, cleaned):
    assert clean.clean_caption(raw) == cleaned
    assert clean.clean_caption(cleaned) == cleaned  # idempotent


@pytest.mark.parametrize("raw, cleaned", [
    ("1girl,solo,  long   hair", "1girl, solo, long hair"),  # split at commas, whitespace collapsed, ", " joins
    ("a,,b, ,c,", "a, b, c"),  # empty tags dropped
    ("solo, 1girl, solo, 1girl, smile", "solo, 1girl, smile"),  # duplicates dropped, first kept, order kept
    ("long hair, long  hair, long_hair", "long hair, long_hair"),  # exact match after whitespace only
    ("tag one\ntag two\r\ntag one", "tag one, tag two"),  # line breaks separate tags
    ("Solo, solo", "Solo, solo"),  # case-sensitive
    (" , ", ""),
])
def test_tag_rules(raw, cleaned):
    assert clean.clean_tags(raw) == cleaned
    assert clean.clean_tags(cleaned) == cleaned


def test_clean_metadata_keeps_other_fields_and_reports_changes(tmp_path):
    meta = {"a": {"caption": "A photo of  a cat", "tags": "cat,cat", "train_resolution": [64, 64]},
            "b": {"caption": "a dog", "tags": "dog"},
            "c": {"caption": None, "tags": 3, "extra": "  kept  "}}
    in_json = tmp_path / "meta.json"
    in_json.write_text(json.dumps(meta), encoding="utf-8")
    out = tmp_path / "clean.json"
    clean.main([str(in_json), str(out), "--debug"])
    assert load_json(out) == {"a": {"caption": "a cat", "tags": "cat", "train_resolution": [64, 64]},
                              "b": {"caption": "a dog", "tags": "dog"},
                              "c": {"caption": None, "tags": 3, "extra": "  kept  "}}
    assert load_json(in_json) == meta
    cleaned, changed = clean.clean_metadata(meta)
    assert changed == ["a"] and meta["a"]["tags"] == "cat,cat"  # the input dict is not modified
    # In place is allowed (atomic replace), and a second pass changes nothing.
    clean.main([str(out), str(out)])
    assert clean.clean_metadata(load_json(out))[1] == []


def test_clean_accepts_the_old_three_argument_form(tmp_path, caplog):
    in_json = tmp_path / "meta.json"
    in_json.write_text(json.dumps({"a": {"tags": "x,,x"}}), encoding="utf-8")
    out = tmp_path / "clean.json"
    with caplog.at_level(logging.WARNING):
        clean.main([str(tmp_path / "train"), str(in_json), str(out)])
    assert load_json(out) == {"a": {"tags": "x"}} and "train_data_dir" in caplog.text
    with pytest.raises(SystemExit) as err:
        clean.main([str(in_json), str(out), "--no_such_flag"])
    assert err.value.code == 2


# ------------------------------------------------------------------------- buckets + latents


@pytest.fixture
def latent_setup(train_dir, tmp_path):
    """train_dir plus a 120x40 strip (bucket 96x32) and an image without metadata; meta.json for the rest."""
    shape_image("square", "green", "white", (120, 40)).save(train_dir / "wide.png")
    (train_dir / "wide.caption").write_text("a wide green square", encoding="utf-8")
    meta = tmp_path / "meta.json"
    merge_captions.main([str(train_dir), str(meta)])
    shape_image("circle", "red", "black").save(train_dir / "unlisted.png")  # in the folder, not in the json
    data = load_json(meta)
    data["orphan"] = {"caption": "an entry without image"}
    meta.write_text(json.dumps(data), encoding="utf-8")
    return train_dir, meta


def vae_posterior(ckpt: Path, pixels: torch.Tensor):
    from library.families.sd.loading import load_vae

    vae, _ = load_vae(ckpt)
    with torch.no_grad():
        dist = vae.encode(pixels[None]).latent_dist
    return dist.mean[0], dist.std[0]


def assert_is_sample_of(latents: np.ndarray, mean: torch.Tensor, std: torch.Tensor, other_mean: torch.Tensor):
    """``latents`` is a posterior sample of this image (within 6 std), and closer to it than to another image."""
    lat = torch.from_numpy(latents)
    assert lat.shape == mean.shape
    assert ((lat - mean).abs() / std).max() < 6
    assert (lat - mean).norm() < (lat - other_mean).norm()


def test_prepare_buckets_latents_npz_and_train_resolution(latent_setup, tmp_path, tiny_sd1_ckpt, caplog):
    train_dir, meta = latent_setup
    out = tmp_path / "meta_lat.json"
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        prepare.main([str(train_dir), str(meta), str(out), str(tiny_sd1_ckpt), *BUCKET_FLAGS, "--flip_aug",
                      "--batch_size", "2", "--max_data_loader_n_workers", "2"])
    assert "unlisted" in caplog.text  # an image without entry is skipped with a warning
    assert not (train_dir / "unlisted.npz").exists()
    expected_buckets = {"img000": (64, 64), "img001": (64, 64), "img002": (64, 64), "wide": (96, 32)}
    result = load_json(out)
    source = load_json(meta)
    for key, (w, h) in expected_buckets.items():
        assert result[key] == {**source[key], "train_resolution": [w, h]}
        with np.load(train_dir / f"{key}.npz") as npz:
            assert set(npz.files) == {"latents", "latents_flipped", "original_size", "crop_ltrb"}
            assert npz["latents"].shape == npz["latents_flipped"].shape == (4, h // 8, w // 8)
            assert npz["latents"].dtype == np.float32
            size = (120, 40) if key == "wide" else (64, 64)
            assert npz["original_size"].tolist() == list(size)
            # 120x40 is exactly 3:1 like its bucket, so the SAI letterbox is the whole bucket
            assert npz["crop_ltrb"].tolist() == [0, 0, w, h]
    assert result["orphan"] == source["orphan"]  # entries without an image are kept as they were
    assert sorted(result) == sorted(source)

    # The stored latents encode the image as the dataset prepares it (and its mirror image).
    items, _ = prepare.plan_images({"wide": train_dir / "wide.png", "img000": train_dir / "img000.png"},
                                   source, prepare.BucketSettings((64, 64), 32, 128, 32).planner())
    wide = next(i for i in items if i.key == "wide")
    pixels, mask = prepare.load_for_encoding(wide, alpha_mask=False)
    assert pixels.shape == (3, 32, 96) and mask is None
    mean, std = vae_posterior(tiny_sd1_ckpt, pixels)
    flipped_mean, _ = vae_posterior(tiny_sd1_ckpt, torch.flip(pixels, dims=[2]))
    with np.load(train_dir / "wide.npz") as npz:
        assert_is_sample_of(npz["latents"], mean, std, flipped_mean)
        assert not np.allclose(npz["latents"], npz["latents_flipped"])


def test_skip_existing_keeps_valid_files_and_encodes_only_new_ones(latent_setup, tmp_path, tiny_sd1_ckpt,
                                                                   monkeypatch):
    train_dir, meta = latent_setup
    args = [str(train_dir), str(meta), str(tmp_path / "out.json"), str(tiny_sd1_ckpt), *BUCKET_FLAGS]
    prepare.main(args)
    keys = ["img000", "img001", "img002", "wide"]
    before = {k: os.stat(train_dir / f"{k}.npz") for k in keys}

    # A new image (with its entry), and one damaged cache file.
    shape_image("triangle", "blue", "yellow").save(train_dir / "new.png")
    data = load_json(meta)
    data["new"] = {"caption": "a blue triangle"}
    meta.write_text(json.dumps(data), encoding="utf-8")
    (train_dir / "img001.npz").write_bytes(b"not an npz")

    report = prepare.run(prepare.setup_parser().parse_args([*args, "--skip_existing"]))
    assert sorted(report.encoded) == ["img001", "new"]
    assert sorted(report.skipped) == ["img000", "img002", "wide"]
    for key in ("img000", "img002", "wide"):
        now = os.stat(train_dir / f"{key}.npz")
        assert (now.st_mtime_ns, now.st_ino, now.st_size) == (before[key].st_mtime_ns, before[key].st_ino,
                                                              before[key].st_size)
    with np.load(train_dir / "img001.npz") as npz:
        assert npz["latents"].shape == (4, 8, 8)
    assert load_json(tmp_path / "out.json")["new"]["train_resolution"] == [64, 64]
    assert load_json(tmp_path / "out.json")["wide"]["train_resolution"] == [96, 32]  # also for kept files

    # Files valid for other flags or buckets are re-encoded: --flip_aug needs latents_flipped ...
    report = prepare.run(prepare.setup_parser().parse_args([*args, "--skip_existing", "--flip_aug"]))
    assert sorted(report.encoded) == ["img000", "img001", "img002", "new", "wide"]
    # ... and another resolution needs other latent sizes; everything valid -> the VAE is not loaded.
    small = [*args, "--skip_existing", "--max_resolution", "32,32"]  # one bucket: 32x32
    report = prepare.run(prepare.setup_parser().parse_args(small))
    assert sorted(report.encoded) == ["img000", "img001", "img002", "new", "wide"]
    with np.load(train_dir / "wide.npz") as npz:
        assert npz["latents"].shape == (4, 4, 4)

    def no_vae(*_args, **_kwargs):
        raise AssertionError("the VAE was loaded although every cache file is valid")

    monkeypatch.setattr(prepare, "_load_encoder", no_vae)
    report = prepare.run(prepare.setup_parser().parse_args(small))
    assert report.encoded == [] and len(report.skipped) == 5


def test_alpha_mask_is_cached(tmp_path, tiny_sd1_ckpt):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :32, 3] = 255  # left half opaque
    Image.fromarray(rgba).save(train_dir / "a.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "half"}}), encoding="utf-8")
    prepare.main([str(train_dir), str(meta), str(tmp_path / "out.json"), str(tiny_sd1_ckpt), *BUCKET_FLAGS,
                  "--alpha_mask"])
    with np.load(train_dir / "a.npz") as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "alpha_mask"}
        mask = npz["alpha_mask"]
    assert mask.shape == (64, 64) and mask.dtype == np.float32
    assert (mask[:, :32] == 1).all() and (mask[:, 32:] == 0).all()


def test_the_dataset_trains_from_these_caches(latent_setup, tmp_path, tiny_sd1_ckpt):
    train_dir, meta = latent_setup
    data = load_json(meta)
    del data["orphan"]  # training needs every listed image
    meta.write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "meta_lat.json"
    prepare.main([str(train_dir), str(meta), str(out), str(tiny_sd1_ckpt), *BUCKET_FLAGS, "--flip_aug"])

    def must_not_encode(images):
        raise AssertionError(f"re-encoded {images.shape}: the prepared <stem>.npz was not used")

    args = parse(in_json=out, train_data_dir=train_dir, flip_aug=True, cache_latents=True, cache_latents_to_disk=True,
                 seed=3, train_batch_size=2, **TRAIN_BUCKET_FLAGS)
    group = build_dataset_group(args)[0]
    assert group.cache_latents(must_not_encode, to_disk=True) == 0
    assert {i.path.stem: i.latents_npz for i in group.images()} == {
        k: train_dir / f"{k}.npz" for k in ("img000", "img001", "img002", "wide")}
    assert not list(train_dir.glob("*_sd.npz"))
    seen = set()
    for epoch in (1, 2):
        group.set_current_epoch(epoch)
        for i in range(len(group)):
            batch = group[i]
            assert batch["images"] is None
            for k, (key, flipped) in enumerate(zip(batch["image_keys"], batch["flippeds"])):
                with np.load(train_dir / f"{key}.npz") as npz:
                    expected = npz["latents_flipped" if flipped else "latents"]
                assert torch.equal(batch["latents"][k], torch.from_numpy(expected))
                seen.add(flipped)
    assert seen == {True, False}

    # And what was encoded is exactly what the dataset would feed the VAE itself.
    plain = build_dataset_group(parse(in_json=out, train_data_dir=train_dir, seed=3, **TRAIN_BUCKET_FLAGS))[0]
    planned, _ = prepare.plan_images({i.image_key: i.path for i in plain.images()}, load_json(out),
                                     prepare.BucketSettings((64, 64), 32, 128, 32).planner())
    mine = {item.key: prepare.load_for_encoding(item, alpha_mask=False)[0] for item in planned}
    for i in range(len(plain)):
        batch = plain[i]
        for k, key in enumerate(batch["image_keys"]):
            assert torch.equal(batch["images"][k], mine[key])


# ------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_by_path_without_torch(script, tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "finetune" / script), "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--console_log_level" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()[1:]}
    assert "torch" not in imported and "numpy" not in imported


def test_prepare_flag_errors(latent_setup, tmp_path, tiny_sd1_ckpt):
    train_dir, meta = latent_setup
    base = [str(train_dir), str(meta), str(tmp_path / "o.json"), str(tiny_sd1_ckpt)]
    for bad in (["--max_resolution", "64x64"], ["--bucket_reso_steps", "20"], ["--batch_size", "0"],
                ["--max_resolution", "2048", "--max_bucket_reso", "1024"]):
        with pytest.raises(SystemExit) as err:
            prepare.main([*base, *bad])
        assert err.value.code == 2, bad
    assert prepare.parse_max_resolution("768") == (768, 768)
    assert prepare.parse_max_resolution("512, 768") == (512, 768)
    with pytest.raises(SystemExit, match="model_name_or_path .*missing.safetensors does not exist"):
        prepare.main([*base[:3], str(tmp_path / "missing.safetensors"), *BUCKET_FLAGS])
    assert not (tmp_path / "o.json").exists()
