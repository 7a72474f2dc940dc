"""finetune.core.io: atomic writes and the OS errors behind a writer's own exceptions."""
from __future__ import annotations

import errno

import pytest

from finetune.core.io import atomic_write, no_room, shell_command


class SafetensorError(Exception):
    """Stands in for safetensors' exception (a Rust error turned into text)."""


@pytest.mark.parametrize("message", [
    # safetensors 0.6 and later
    "Error while serializing: I/O error: No space left on device (os error 28)",
    # safetensors 0.4 / 0.5 (pyproject allows >=0.4): Rust's Debug form of the same io::Error
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
])
def test_a_full_disk_reported_by_safetensors_reads_as_a_full_disk(tmp_path, message):
    """QA: with safetensors 0.4 / 0.5 a full disk (or a file-size limit) while converting a .pth was a
    SafetensorError traceback from `zoo pull`: only 0.6's "(os error N)" wording was recognised."""
    def write(tmp: str) -> None:
        raise SafetensorError(message)

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "model.safetensors", write)
    assert caught.value.errno == errno.ENOSPC and no_room(caught.value)
    assert caught.value.filename == str(tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_shell_command_quotes_only_the_words_a_shell_would_change():
    import shlex

    words = ["zoo", "finetune", "--resume", "/tmp/my runs/a $HOME b'c", "--data", "DIR", "--lr", "0.001", ""]
    line = shell_command(*words)
    assert shlex.split(line) == words
    assert line.startswith("zoo finetune --resume '/tmp/my runs/a $HOME b'\"'\"'c' --data DIR --lr 0.001")


def test_the_lines_that_name_a_run_name_its_paths_absolute(tmp_path, monkeypatch):
    """Session 39: the resume line named the run folder as typed (``--out runs/a``: pasted from another folder it
    named nothing there), while the ``next:`` lines made their paths absolute one by one at each call. Now both
    helpers do, for every ``Path`` (a str stays a word or a placeholder)."""
    import shlex
    from pathlib import Path

    from finetune.core.io import new_run_command, resume_command

    monkeypatch.chdir(tmp_path)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    words = shlex.split(resume_command("runs/my run", "--data", Path("data")))
    assert words[words.index("--resume"):] == ["--resume", str(tmp_path / "runs/my run"),
                                               "--data", str(tmp_path / "data")]
    words = shlex.split(new_run_command("--config", Path("runs/a/config.yaml"), "--lr", "0.01", model="resnet18",
                                        data=Path("photos")))
    assert words[words.index("finetune"):] == ["finetune", "resnet18", "--data", str(tmp_path / "photos"), "--config",
                                               str(tmp_path / "runs/a/config.yaml"), "--lr", "0.01"]
    assert shlex.split(new_run_command())[-3:] == ["MODEL", "--data", "DIR"]


def test_json_safe_is_plain_strict_json_data_nested_and_leaves_other_values_as_they_are():
    """The one JSON-sanitiser (summary.json, doctor.json, a sweep's records, model.json's data_config since
    helper-90 folded zoo.jobs.finetune's own ``_plain`` into it): dicts copied, lists and tuples as lists at any
    depth, NaN and infinities as None, every other value (numbers, text, None, booleans) itself."""
    from finetune.core.io import json_safe

    value = {"mean": (0.5, 0.25, 0.125), "input_size": (3, 32, 32), "crop_pct": 0.875, "name": "bicubic",
             "nested": {"list": [1, (2, float("nan"))], "inf": float("-inf"), "none": None, "flag": True}}
    assert json_safe(value) == {"mean": [0.5, 0.25, 0.125], "input_size": [3, 32, 32], "crop_pct": 0.875,
                                "name": "bicubic", "nested": {"list": [1, [2, None]], "inf": None, "none": None,
                                                              "flag": True}}
    assert type(json_safe(value)["mean"]) is list and json_safe(value) is not value


def test_write_json_writes_the_json_text_and_a_newline_atomically_with_the_callers_options(tmp_path):
    """finetune.core.io.write_json, the one JSON writer (helper-90: twelve ``atomic_write_text(path,
    json.dumps(...) + "\\n")`` lines and zoo.jobs.finetune's own ``_write_json``): exactly ``json.dumps(data,
    **options) + "\\n"`` in UTF-8, a folder made for it, no temp file left beside it."""
    import json
    import os

    from finetune.core.io import write_json

    data = {"b": "café 猫", "a": [1, 2.5, None], "t": (3, 4)}
    for options in ({}, {"indent": 2}, {"indent": 2, "ensure_ascii": False}, {"indent": 2, "sort_keys": True},
                    {"separators": (",", ":")}):
        path = tmp_path / "new" / "f.json"
        write_json(path, data, **options)
        assert path.read_bytes() == (json.dumps(data, **options) + "\n").encode("utf-8")
        assert os.listdir(path.parent) == ["f.json"]
    write_json(path, {"x": object()}, default=lambda v: "obj")
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": "obj"}


def test_csv_text_is_the_csv_modules_quoting_with_newline_line_ends():
    """finetune.core.io.csv_text, the one CSV writer (helper-90: zoo eval's ``_csv_text`` and the StringIO +
    csv.writer of findings.csv, lr_find.csv and confusion.csv): each row a line ending in ``\\n`` on every OS, a
    cell with a comma, a quote or a line break quoted, numbers and None as csv writes them; rows may be a
    generator."""
    from finetune.core.io import csv_text

    rows = [("path", "class"), ("a,b.png", 'say "hi"'), ("two\nlines", None), (1, 0.5)]
    assert csv_text(rows) == 'path,class\n"a,b.png","say ""hi"""\n"two\nlines",\n1,0.5\n'
    assert csv_text(iter(rows)) == csv_text(rows) and csv_text([]) == ""


def test_yaml_problem_says_where_and_what_on_one_line():
    """finetune.core.io.yaml_problem, the one wording of a YAML file's syntax error (helper-90: the config reader and
    the registry parser each had a copy): where (1-based line and column) when PyYAML knows it, then its problem,
    whitespace folded to one line."""
    import yaml

    from finetune.core.io import load_yaml, yaml_problem

    with pytest.raises(yaml.YAMLError) as err:
        load_yaml("lr: 0.1\nepochs: 3\nlr: 0.5\n", unique_keys=True)
    assert yaml_problem(err.value) == (" at line 3, column 1: lr is given twice (lines 1 and 3), and only the last "
                                       "would count: keep one")
    with pytest.raises(yaml.YAMLError) as err:
        load_yaml("a: [1, 2\nb: 3\n")
    assert yaml_problem(err.value).startswith(" at line 2, column ") and "\n" not in yaml_problem(err.value)
    assert yaml_problem(yaml.YAMLError("no place\n  known")) == ": no place known"


def test_printable_escapes_characters_that_print_blank_and_keeps_what_shows():
    """Session 32's leftovers (helper-127): a class named with a Hangul filler (U+3164) or the blank Braille cell
    (U+2800), both printable to Python, printed as a blank class in every line (`cat` for `cat\\u3164`, a class
    ` ` for `\\u3164` alone, which the scan's whitespace-only refusal does not catch). Escaped as a zero-width
    space is; text that shows (accents, CJK, Hangul syllables, symbols) stays as it is."""
    from finetune.core.io import printable

    assert printable("cat\u3164") == "cat\\u3164" and printable("\u2800") == "\\u2800"
    assert printable("a\u115f\u1160\uffa0b") == "a\\u115f\\u1160\\uffa0b"
    assert printable("cat\u200b\xa0\u202e\t") == "cat\\u200b\\xa0\\u202e\\t"
    assert printable("café 猫 ✓ 한국어") == "café 猫 ✓ 한국어"
