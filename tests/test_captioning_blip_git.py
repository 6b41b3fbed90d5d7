"""finetune/make_captions.py (BLIP) and finetune/make_captions_by_git.py (GIT) on tiny random models.

The tiny models (``tests/captioning_helpers.py``) always say one word (BLIP "red", GIT "square"),
repeated until ``--max_length`` tokens (the start token included), so captions are exact.
Nothing is downloaded: the models are local folders, and ``HF_HUB_OFFLINE=1`` is set for the
repo-id error cases.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import make_captions as blip_script
from finetune import make_captions_by_git as git_script
from library.captioning.text_cleanup import remove_words
from tests.captioning_helpers import broken, solid, write_tiny_blip, write_tiny_git

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_test_logging(monkeypatch):
    """``main`` configures the root logger for users; in tests that would remove caplog's handler."""
    for module in (blip_script, git_script):
        monkeypatch.setattr(module, "setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory) -> Path:
    return write_tiny_git(tmp_path_factory.mktemp("git") / "tiny-git")


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "train"
    solid(folder / "a.png", (255, 0, 0), size=(40, 32))
    solid(folder / "b.jpg", (0, 0, 255), size=(32, 48))
    solid(folder / "c.webp", (0, 255, 0, 128), size=(32, 32), mode="RGBA")
    return folder


def captions(folder: Path, pattern: str = "*.caption") -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8") for p in sorted(folder.rglob(pattern))}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


# ------------------------------------------------------------------------------------- BLIP


def test_blip_writes_a_caption_for_every_image(images, blip_dir):
    blip_script.main([str(images), "--caption_weights", str(blip_dir), "--max_length", "6", "--min_length", "2",
                      "--batch_size", "2"])
    assert captions(images) == {name: "red red red red red\n" for name in ("a.caption", "b.caption", "c.caption")}


def test_blip_beam_search_recursive_extension_and_threads(images, blip_dir):
    solid(images / "sub" / "d.png", (10, 10, 10))
    blip_script.main([str(images), "--caption_weights", str(blip_dir), "--beam_search", "--num_beams", "2",
                      "--max_length", "4", "--min_length", "1", "--recursive", "--caption_extension", "txt",
                      "--max_data_loader_n_workers", "2", "--batch_size", "3", "--seed", "1"])
    assert captions(images, "*.txt") == {name: "red red red\n" for name in ("a.txt", "b.txt", "c.txt", "sub/d.txt")}
    assert not captions(images)


def test_blip_sampling_follows_seed(tmp_path):
    model = write_tiny_blip(tmp_path / "mixed-blip", boost=2.0)
    folder = tmp_path / "train"
    for i in range(3):
        solid(folder / f"{i}.png", (80 * i, 0, 0))
    runs = []
    for seed in ("3", "3", "4"):
        blip_script.main([str(folder), "--caption_weights", str(model), "--max_length", "8", "--min_length", "6",
                          "--batch_size", "3", "--seed", seed])
        runs.append(captions(folder))
    assert len(runs[0]) == 3 and runs[0] == runs[1]
    assert len(set(runs[0].values())) > 1  # sampled: not one fixed caption
    assert runs[2] != runs[0]


def test_blip_skips_unreadable_image_with_warning(images, blip_dir, caplog):
    broken(images / "bad.png")
    with caplog.at_level(logging.WARNING):
        blip_script.main([str(images), "--caption_weights", str(blip_dir), "--max_length", "3", "--min_length", "0",
                          "--debug"])
    assert sorted(captions(images)) == ["a.caption", "b.caption", "c.caption"]
    assert any("bad.png" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_blip_missing_model_is_one_line_error(images, tmp_path, blip_dir):
    missing = tmp_path / "models" / "blip-large"
    with pytest.raises(SystemExit) as excinfo:
        blip_script.main([str(images), "--caption_weights", str(missing)])
    message = one_line_error(excinfo)
    assert str(missing) in message and "save_pretrained" in message

    with pytest.raises(SystemExit) as excinfo:  # a repo id not in the cache (offline: nothing is downloaded)
        blip_script.main([str(images), "--caption_weights", "nobody-here/no-such-blip-model"])
    message = one_line_error(excinfo)
    assert "nobody-here/no-such-blip-model" in message and "hf download" in message and "--local-dir" in message

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as excinfo:
        blip_script.main([str(images), "--caption_weights", str(tmp_path / "empty")])
    assert "config.json" in one_line_error(excinfo)

    half = tmp_path / "half"  # a config but no weights
    half.mkdir()
    (half / "config.json").write_bytes((blip_dir / "config.json").read_bytes())
    with pytest.raises(SystemExit) as excinfo:
        blip_script.main([str(images), "--caption_weights", str(half)])
    assert "cannot load the BLIP captioning model from this folder" in one_line_error(excinfo)

    with pytest.raises(SystemExit) as excinfo:
        blip_script.main([str(images), "--caption_weights", "https://example.invalid/other_blip.pth"])
    assert ".pth" in one_line_error(excinfo)


def test_blip_original_checkpoint_url_means_the_transformers_repo(monkeypatch):
    url = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large_caption.pth"
    assert blip_script.weights_source(url) == blip_script.DEFAULT_WEIGHTS
    assert blip_script.weights_source("some/repo") == "some/repo"


def test_blip_bad_flags(images, blip_dir):
    for flags, word in ((["--num_beams", "0"], "--num_beams"), (["--top_p", "0"], "--top_p"),
                        (["--max_length", "3", "--min_length", "5"], "--max_length"),
                        (["--batch_size", "0"], "--batch_size")):
        with pytest.raises(SystemExit) as excinfo:
            blip_script.main([str(images), "--caption_weights", str(blip_dir), *flags])
        assert word in one_line_error(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        blip_script.main([str(images / "nope"), "--caption_weights", str(blip_dir)])
    assert "nope" in one_line_error(excinfo)


def test_shared_caption_file_written_once(tmp_path, blip_dir, caplog):
    folder = tmp_path / "train"
    solid(folder / "x.png", (1, 2, 3))
    solid(folder / "x.jpg", (1, 2, 3))
    with caplog.at_level(logging.WARNING):
        blip_script.main([str(folder), "--caption_weights", str(blip_dir), "--max_length", "3", "--min_length", "2"])
    assert captions(folder) == {"x.caption": "red red\n"}
    assert any("share the caption file" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------- GIT


def test_git_writes_a_caption_for_every_image(images, git_dir, caplog):
    broken(images / "zz.jpg")
    with caplog.at_level(logging.WARNING):
        git_script.main([str(images), "--model_id", str(git_dir), "--max_length", "5", "--batch_size", "2",
                         "--remove_words"])
    assert captions(images) == {name: "square square square square\n" for name in ("a.caption", "b.caption",
                                                                                  "c.caption")}
    assert any("zz.jpg" in r.getMessage() for r in caplog.records)


def test_git_missing_model_is_one_line_error(images, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        git_script.main([str(images), "--model_id", str(tmp_path / "git-large")])
    assert "git-large" in one_line_error(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        git_script.main([str(images), "--model_id", "nobody-here/no-such-git"])
    message = one_line_error(excinfo)
    assert "nobody-here/no-such-git" in message and "--model_id" in message


def test_folder_of_another_model_is_one_line_error(images, blip_dir, git_dir):
    with pytest.raises(SystemExit) as excinfo:
        git_script.main([str(images), "--model_id", str(blip_dir)])
    assert "'blip' model, not a GIT captioning model" in one_line_error(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        blip_script.main([str(images), "--caption_weights", str(git_dir)])
    assert "'git' model, not a BLIP captioning model" in one_line_error(excinfo)


@pytest.mark.parametrize("caption, expected", [
    ("a sign that says stop on a pole", "a sign on a pole"),
    ("a poster with the words 'happy birthday' on it", "a poster on it"),
    ('a sign saying "no parking" in a street', "a sign in a street"),
    ("a book with the title harry potter", "a book"),
    ("a bottle which reads coca cola.", "a bottle."),
    ("a jersey with the number 23, on a hanger", "a jersey, on a hanger"),
    ("a man reading a book", "a man reading a book"),
    ("a red car with a white stripe", "a red car with a white stripe"),
])
def test_remove_words(caption, expected):
    assert remove_words(caption) == expected


# ------------------------------------------------------------------------------------- CLI


def test_help_is_fast_and_lists_the_flags():
    code = ("import sys, finetune.make_captions as b, finetune.make_captions_by_git as g; "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules; "
            "print(b.setup_parser().format_help()); print(g.setup_parser().format_help())")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--caption_weights", "--beam_search", "--num_beams", "--top_p", "--max_length", "--min_length",
                 "--seed", "--model_id", "--remove_words", "--max_data_loader_n_workers", "--console_log_level"):
        assert flag in result.stdout
