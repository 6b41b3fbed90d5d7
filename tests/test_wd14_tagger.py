"""finetune/tag_images_by_wd14_tagger.py on a tiny ONNX tagger whose probabilities follow the image colour.

The tagger of ``tests/captioning_helpers.py`` gives, for a plain image, exactly the probabilities
listed in ``TAGS`` (e.g. ``red_hair`` = the red channel, ``long_hair`` = 0.40), so thresholds and
every option are checked against exact tag lists.
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

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from finetune import tag_images_by_wd14_tagger as tagger_script  # noqa: E402
from library.captioning import tagger_files  # noqa: E402
from library.captioning.onnx_tagger import pad_to_square, preprocess  # noqa: E402
from library.captioning.tag_rules import TagOptions, merge_with_existing, select_tags, split_tag_list  # noqa: E402
from library.captioning.tag_table import (NameRules, build_tags, expand_character, parse_tag_replacement,  # noqa: E402
                                          read_tag_csv)
from library.captioning.errors import CaptioningError  # noqa: E402
from tests.captioning_helpers import broken, solid, write_tiny_tagger  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The tags a pure red image gets with the default flags (thresh 0.35), in the written order.
RED_DEFAULT = ["red_hair", "long_hair", "^_^", "1girl", "alice", "vocaloid", "some_artist", "highres", "sdxl"]


@pytest.fixture(autouse=True)
def keep_test_logging(monkeypatch):
    """``main`` configures the root logger for users; in tests that would remove caplog's handler."""
    monkeypatch.setattr(tagger_script, "setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach the hub, whatever a test does


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_tagger(tmp_path_factory.mktemp("tagger") / "model")


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "train"
    solid(folder / "red.png", (255, 0, 0))
    solid(folder / "blue.jpg", (0, 0, 255), size=(24, 24))  # enlarged 24 -> 16: still plain blue
    solid(folder / "green.webp", (0, 255, 0), size=(20, 20))
    return folder


def run(folder: Path, model_dir: Path, *flags: str):
    return tagger_script.main([str(folder), "--model_dir", str(model_dir), *flags])


def tags_of(path: Path, sep: str = ", ") -> list[str]:
    return path.read_text(encoding="utf-8").rstrip("\n").split(sep)


# ----------------------------------------------------------------------------------- basics


def test_default_run_writes_txt_for_every_image_with_exact_tags(images, model_dir):
    run(images, model_dir, "--onnx")
    assert sorted(p.name for p in images.glob("*.txt")) == ["blue.txt", "green.txt", "red.txt"]
    assert tags_of(images / "red.txt") == RED_DEFAULT
    assert (images / "red.txt").read_text(encoding="utf-8").endswith("sdxl\n")
    assert tags_of(images / "blue.txt") == ["blue_sky"] + RED_DEFAULT[1:]
    assert tags_of(images / "green.txt") == ["long_hair", "^_^", "1girl", "hatsune_miku_(vocaloid)", "alice",
                                             "vocaloid", "some_artist", "highres", "sdxl"]


def test_unreadable_image_skipped_with_warning(images, model_dir, caplog):
    broken(images / "broken.png")
    with caplog.at_level(logging.WARNING):
        run(images, model_dir, "--batch_size", "2")
    assert not (images / "broken.txt").exists()
    assert sorted(p.name for p in images.glob("*.txt")) == ["blue.txt", "green.txt", "red.txt"]
    assert tags_of(images / "red.txt") == RED_DEFAULT
    assert any("broken.png" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_preprocessing_pads_on_white_and_uses_bgr(tmp_path, model_dir):
    folder = tmp_path / "train"
    solid(folder / "wide_black.png", (0, 0, 0), size=(32, 16))  # half white after padding: every channel 0.5
    solid(folder / "clear.png", (0, 0, 0, 0), mode="RGBA")  # fully transparent: white
    run(folder, model_dir, "--use_rating_tags")
    wide = tags_of(folder / "wide_black.txt")
    assert wide[0] == "general"  # explicit (red 0.5) only ties general (0.5): the first maximum wins
    assert {"red_hair", "blue_sky", "hatsune_miku_(vocaloid)"} <= set(wide)  # 0.5 each; black padding: 0
    clear = tags_of(folder / "clear.txt")
    assert clear[:3] == ["explicit", "red_hair", "blue_sky"]


def test_preprocess_array_layout():
    from PIL import Image

    array = preprocess(Image.new("RGB", (8, 4), (10, 20, 30)), (6, 6))
    assert array.shape == (6, 6, 3) and array.dtype == np.float32
    assert array[3, 3].tolist() == [30.0, 20.0, 10.0]  # BGR, 0-255
    assert array[0, 0].tolist() == [255.0, 255.0, 255.0]  # padding rows are white
    square = pad_to_square(np.zeros((2, 4, 3), dtype=np.uint8))
    assert square.shape == (4, 4, 3) and square[0].min() == 255 and square[1:3].max() == 0


def test_fixed_batch_model_and_other_input_size_with_threads(images, tmp_path):
    fixed = write_tiny_tagger(tmp_path / "fixed", size=24, fixed_batch=1)
    broken(images / "zz_broken.png")
    run(images, fixed, "--batch_size", "3", "--max_data_loader_n_workers", "2")
    assert tags_of(images / "red.txt") == RED_DEFAULT
    assert tags_of(images / "blue.txt")[0] == "blue_sky"


def test_recursive_and_caption_extension(images, model_dir):
    solid(images / "sub" / "deep.png", (255, 0, 0))
    run(images, model_dir, "--caption_extension", "tags")
    assert not (images / "sub" / "deep.tags").exists() and (images / "red.tags").is_file()
    run(images, model_dir, "--caption_extention", ".tags", "--recursive")  # the old spelling still works
    assert tags_of(images / "sub" / "deep.tags") == RED_DEFAULT
    assert not list(images.rglob("*.txt"))


# -------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("flags, expected", [
    (["--thresh", "0.41"], ["red_hair", "^_^", "1girl", "alice", "vocaloid", "some_artist", "sdxl"]),
    (["--thresh", "0.75"], ["red_hair", "^_^", "1girl"]),
    (["--general_threshold", "0.85"], ["red_hair", "^_^", "alice", "vocaloid", "some_artist", "highres", "sdxl"]),
    (["--general_threshold", "0.25"], ["red_hair", "long_hair", "^_^", "simple_background", "1girl", "alice",
                                       "vocaloid", "some_artist", "highres", "sdxl"]),
    (["--character_threshold", "0.6"], ["red_hair", "long_hair", "^_^", "1girl", "vocaloid", "some_artist",
                                        "highres", "sdxl"]),
    (["--copyright_threshold", "0.71", "--artist_threshold", "0.46", "--meta_threshold", "0.39",
      "--model_threshold", "0.61"], ["red_hair", "long_hair", "^_^", "1girl", "alice"]),
    (["--thresh", "0.75", "--character_threshold", "0.5", "--meta_threshold", "0.1"],
     ["red_hair", "^_^", "1girl", "alice", "highres"]),
])
def test_thresholds(images, model_dir, flags, expected):
    run(images, model_dir, *flags)
    assert tags_of(images / "red.txt") == expected


# ----------------------------------------------------------------------------- tag options


@pytest.mark.parametrize("flags, expected", [
    (["--use_rating_tags"], ["explicit"] + RED_DEFAULT),
    (["--use_rating_tags_as_last_tag"], RED_DEFAULT + ["explicit"]),
    (["--use_quality_tags"], ["best_quality"] + RED_DEFAULT),
    (["--use_quality_tags_as_last_tag", "--use_rating_tags_as_last_tag"], RED_DEFAULT + ["best_quality", "explicit"]),
    (["--use_rating_tags", "--use_quality_tags"], ["explicit", "best_quality"] + RED_DEFAULT),
    (["--character_tags_first"], ["alice", "red_hair", "long_hair", "^_^", "1girl", "vocaloid", "some_artist",
                                  "highres", "sdxl"]),
    (["--always_first_tags", "1girl, sdxl,not_found", "--use_rating_tags"],
     ["1girl", "sdxl", "explicit", "red_hair", "long_hair", "^_^", "alice", "vocaloid", "some_artist", "highres"]),
    (["--undesired_tags", "long_hair,^_^, sdxl"], ["red_hair", "1girl", "alice", "vocaloid", "some_artist", "highres"]),
    (["--undesired_tags", "explicit", "--use_rating_tags"], RED_DEFAULT),
    (["--remove_underscore"], ["red hair", "long hair", "^_^", "1girl", "alice", "vocaloid", "some artist",
                               "highres", "sdxl"]),
    (["--remove_underscore", "--undesired_tags", "long_hair, red hair"],  # CSV or written name both match
     ["^_^", "1girl", "alice", "vocaloid", "some artist", "highres", "sdxl"]),
    (["--tag_replacement", "red_hair,scarlet hair;1girl,solo girl;sdxl,"],
     ["scarlet hair", "long_hair", "^_^", "solo girl", "alice", "vocaloid", "some_artist", "highres"]),
    (["--tag_replacement", "red hair,red\\, crimson", "--remove_underscore", "--thresh", "0.75"],
     ["red", "crimson", "^_^", "1girl"]),  # the replacement holds the separator: written as it is
])
def test_tag_options_on_red(images, model_dir, flags, expected):
    run(images, model_dir, *flags)
    assert tags_of(images / "red.txt") == expected


def test_character_tag_expand_and_separator(images, model_dir):
    run(images, model_dir, "--character_tag_expand", "--character_tags_first", "--thresh", "0.75",
        "--caption_separator", " | ")
    # hatsune_miku_(vocaloid) -> hatsune_miku | vocaloid; vocaloid (copyright) is below 0.75 here
    assert tags_of(images / "green.txt", " | ") == ["hatsune_miku", "vocaloid", "^_^", "1girl"]
    run(images, model_dir, "--character_tag_expand", "--remove_underscore", "--character_tags_first")
    green = tags_of(images / "green.txt")
    assert green[:2] == ["hatsune miku", "vocaloid"]
    assert green.count("vocaloid") == 1  # also the copyright tag: written once


def test_rating_is_the_single_most_probable(images, model_dir):
    run(images, model_dir, "--use_rating_tags", "--use_quality_tags")
    assert tags_of(images / "red.txt")[:2] == ["explicit", "best_quality"]
    assert tags_of(images / "blue.txt")[:3] == ["general", "normal_quality", "blue_sky"]
    assert "sensitive" not in tags_of(images / "blue.txt")


# ------------------------------------------------------------------------------------ append


def test_append_keeps_existing_tags_and_does_not_duplicate(images, model_dir):
    (images / "red.txt").write_text("my_style, 1girl,  red_hair\n", encoding="utf-8")
    run(images, model_dir, "--append_tags")
    assert tags_of(images / "red.txt") == ["my_style", "1girl", "red_hair", "long_hair", "^_^", "alice", "vocaloid",
                                           "some_artist", "highres", "sdxl"]
    run(images, model_dir, "--append_tags")  # a second run changes nothing
    assert tags_of(images / "red.txt")[:4] == ["my_style", "1girl", "red_hair", "long_hair"]
    assert len(tags_of(images / "red.txt")) == 10
    assert tags_of(images / "blue.txt")[0] == "blue_sky"  # no file before: just the new tags
    run(images, model_dir)  # without --append_tags the file is replaced
    assert tags_of(images / "red.txt") == RED_DEFAULT


def test_no_tag_found_writes_no_file(images, model_dir, caplog):
    (images / "blue.txt").write_text("kept\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        run(images, model_dir, "--thresh", "1.5")
    assert not (images / "red.txt").exists()
    assert (images / "blue.txt").read_text(encoding="utf-8") == "kept\n"
    assert any("no tag" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- output files


def test_jsonl_output(images, model_dir):
    out = images.parent / "tags.jsonl"
    run(images, model_dir, "--output_path", str(out), "--use_rating_tags")
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    by_path = {Path(item["image_path"]).name: item["tags"] for item in lines}
    assert by_path["red.png"] == ", ".join(["explicit"] + RED_DEFAULT)
    assert set(by_path) == {"red.png", "blue.jpg", "green.webp"}
    assert all(os.path.isabs(item["image_path"]) for item in lines)
    assert not list(images.glob("*.txt"))  # one file instead of per-image files


def test_json_output_updates_existing_file_and_appends(images, model_dir):
    out = images.parent / "meta.json"
    red_key = os.path.abspath(images / "red.png")
    out.write_text(json.dumps({red_key: {"caption": "a red picture", "tags": "my_style, 1girl"},
                               "other": {"caption": "kept"}}), encoding="utf-8")
    run(images, model_dir, "--output_path", str(out), "--append_tags")
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["other"] == {"caption": "kept"}
    assert data[red_key]["caption"] == "a red picture"
    assert data[red_key]["tags"] == ", ".join(["my_style", "1girl", "red_hair", "long_hair", "^_^", "alice",
                                                "vocaloid", "some_artist", "highres", "sdxl"])
    assert len(data) == 4
    run(images, model_dir, "--output_path", str(out))
    assert json.loads(out.read_text(encoding="utf-8"))[red_key]["tags"] == ", ".join(RED_DEFAULT)


def test_json_output_is_readable_by_training(images, model_dir):
    from library.data.subsets import _read_metadata

    out = images.parent / "tags.jsonl"
    run(images, model_dir, "--output_path", str(out))
    entries = _read_metadata(out)
    assert entries[os.path.abspath(images / "red.png")]["tags"] == ", ".join(RED_DEFAULT)


def test_frequency_tags(images, model_dir, caplog):
    with caplog.at_level(logging.INFO):
        run(images, model_dir, "--frequency_tags", "--thresh", "0.75")
    messages = [r.getMessage() for r in caplog.records]
    assert "  ^_^: 3" in messages and "  red_hair: 1" in messages and "  blue_sky: 1" in messages
    assert messages.index("  1girl: 3") < messages.index("  blue_sky: 1")  # most frequent first


# --------------------------------------------------------------------------- model and errors


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_missing_model_is_one_line_error(images, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        run(images, tmp_path / "no_models", "--repo_id", "someone/some-tagger")
    message = one_line_error(excinfo)
    assert "model.onnx" in message and "someone/some-tagger" in message and "no_models" in message


def test_repo_id_is_downloaded_into_model_dir(images, tmp_path, model_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_download(repo_id, filename, folder, *, force=False):
        calls.append((repo_id, filename, Path(folder), force))
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / filename).write_bytes((model_dir / filename).read_bytes())
        return Path(folder) / filename

    monkeypatch.setattr(tagger_files, "download_file", fake_download)
    models = tmp_path / "models"
    run(images, models, "--repo_id", "someone/tiny-tagger")
    target = models / "someone_tiny-tagger"
    assert calls == [("someone/tiny-tagger", "model.onnx", target, False),
                     ("someone/tiny-tagger", "selected_tags.csv", target, False)]
    assert tags_of(images / "red.txt") == RED_DEFAULT
    run(images, models, "--repo_id", "someone/tiny-tagger")  # present now: no second download
    assert len(calls) == 2
    run(images, models, "--repo_id", "someone/tiny-tagger", "--force_download")
    assert len(calls) == 4 and calls[-1][3] is True

    def failing(*args, **kwargs):
        raise OSError("404 Client Error: Repository Not Found\nmore details")

    monkeypatch.setattr(tagger_files, "download_file", failing)
    with pytest.raises(SystemExit) as excinfo:
        run(images, tmp_path / "elsewhere", "--repo_id", "someone/missing")
    message = one_line_error(excinfo)
    assert "someone/missing" in message and "Repository Not Found" in message


def test_missing_onnxruntime_message(images, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(SystemExit) as excinfo:
        run(images, model_dir)
    message = one_line_error(excinfo)
    assert "onnxruntime is not installed" in message and "pip install onnxruntime" in message


def test_script_imports_and_helps_without_onnxruntime():
    code = ("import sys; sys.modules['onnxruntime'] = None; "
            "import finetune.tag_images_by_wd14_tagger as t; t.main(['--help'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--use_rating_tags_as_last_tag" in result.stdout and "--character_tag_expand" in result.stdout


def test_tag_list_not_matching_model(images, tmp_path):
    bad = write_tiny_tagger(tmp_path / "bad", csv_rows=5)
    with pytest.raises(SystemExit) as excinfo:
        run(images, bad)
    assert "5 tags" in one_line_error(excinfo)


def test_bad_flags_and_files(images, model_dir, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        run(images, model_dir, "--tag_replacement", "a,b,c")
    assert "--tag_replacement" in one_line_error(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        run(tmp_path / "nowhere", model_dir)
    assert "nowhere" in one_line_error(excinfo)
    bad_out = tmp_path / "bad.json"
    bad_out.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(SystemExit) as excinfo:
        run(images, model_dir, "--output_path", str(bad_out))
    assert "bad.json" in one_line_error(excinfo)
    csv_dir = write_tiny_tagger(tmp_path / "csv")
    (csv_dir / "selected_tags.csv").write_text("id,tag\n1,a\n", encoding="utf-8")
    with pytest.raises(SystemExit) as excinfo:
        run(images, csv_dir)
    assert "tag_id,name,category,count" in one_line_error(excinfo)


# ----------------------------------------------------------------------------------- units


def test_parse_tag_replacement():
    assert parse_tag_replacement("a,b;c d , e;") == {"a": "b", "c d": "e"}
    assert parse_tag_replacement(r"x\,y,z\;w") == {"x,y": "z;w"}
    assert parse_tag_replacement(None) == {} and parse_tag_replacement("") == {}
    for bad in ("a", "a,b,c", ",b"):
        with pytest.raises(CaptioningError):
            parse_tag_replacement(bad)


def test_expand_character():
    assert expand_character("hatsune_miku_(vocaloid)") == ("hatsune_miku", "vocaloid")
    assert expand_character("saber (fate)") == ("saber", "fate")
    assert expand_character("a_(b)_(c)") == ("a_(b)", "c")
    assert expand_character("plain") == ("plain",) and expand_character("(only)") == ("(only)",)


def test_read_tag_csv_categories(tmp_path, caplog):
    path = tmp_path / "selected_tags.csv"
    path.write_text("tag_id,name,category,count\n1,a,9,1\n2,b,0,1\n3,c,Quality,1\n4,d,7,1\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert read_tag_csv(path) == [("a", "rating"), ("b", "general"), ("c", "quality"), ("d", "general")]
    assert any("unknown category" in r.getMessage() for r in caplog.records)


def test_select_tags_units():
    tags = build_tags([("r1", "rating"), ("r2", "rating"), ("g_1", "general"), ("c", "character")],
                      NameRules(remove_underscore=False))
    options = TagOptions(thresholds={c: 0.5 for c in ("general", "character", "copyright", "artist", "meta", "model")},
                         use_rating_tags=True)
    assert select_tags([0.1, 0.2, 0.5, 0.49], tags, options) == ["r2", "g_1"]  # >= threshold
    assert split_tag_list("a, b,,c\nd", ", ") == ["a", "b", "c", "d"]
    assert merge_with_existing("x, y", ["y", "z"]) == ["x", "y", "z"]
