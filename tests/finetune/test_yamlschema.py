"""finetune.core.yamlschema: the files that hold option values (a --config file, a run's config.yaml, a registry)
keep each plain scalar's text as written, and each option reads that text by its kind with the one reader of that
kind (helper-152: `params: 25_557_032` and `override: yes` in a user registry were refused, `out: 1.50` became
the folder 1.5)."""
from __future__ import annotations

import math

import pytest
import yaml
from click.types import BoolParamType

from finetune.core import yamlschema
from finetune.core.io import load_yaml


def test_an_options_file_keeps_each_plain_scalar_as_written_and_null_as_unset():
    text = "a: 1.50\nb: 010\nc: 1e3\nd: .inf\ne: null\nf: yes\ng: [1.0, 2]\nh: 25_557_032\ni: ~\nj:\nk: '1.50'\n"
    assert load_yaml(text, as_text=True) == {"a": "1.50", "b": "010", "c": "1e3", "d": ".inf", "e": None, "f": "yes",
                                             "g": ["1.0", "2"], "h": "25_557_032", "i": None, "j": None, "k": "1.50"}
    with pytest.raises(yaml.YAMLError, match="a is given twice"):
        load_yaml("a: 1\na: 2\n", unique_keys=True, as_text=True)


@pytest.mark.parametrize("text, value", [
    ("25_557_032", 25557032), ("010", 10), ("-3", -3), ("+7", 7), ("20.0", 20), ("1.0e+3", 1000), (12, 12),
    (12.0, 12)])
def test_a_whole_number_reads_what_python_int_reads(text, value):
    """click's INT is int(): `_` allowed, no octal; a YAML float with a dot that is whole counts (`steps: 20.0`)."""
    assert yamlschema.as_int(text) == value and type(yamlschema.as_int(text)) is int


@pytest.mark.parametrize("text", ["1e3", "20.5", "true", "", "0x1F", "1:0:3", True, None, [1], 2.5, ".inf"])
def test_a_whole_number_refuses_other_text(text):
    with pytest.raises(ValueError):
        yamlschema.as_int(text)


@pytest.mark.parametrize("text, value", [("1.50", 1.5), ("1e-3", 1e-3), (".inf", math.inf), ("-.inf", -math.inf),
                                         ("1_000.5", 1000.5), ("3", 3.0), (2, 2.0), ("inf", math.inf)])
def test_a_number_reads_yaml_s_spelling_and_python_s(text, value):
    assert yamlschema.as_float(text) == value


@pytest.mark.parametrize("text", ["abc", "true", "", True, None, ["1"], "1:30"])
def test_a_number_refuses_other_text(text):
    with pytest.raises(ValueError):
        yamlschema.as_float(text)
    assert math.isnan(yamlschema.as_float(".nan"))


def test_a_boolean_reads_the_words_of_the_cli_s_boolean_flags_in_any_case():
    words = {w: v for w, v in BoolParamType.bool_states.items() if w}
    assert set(words) == {"1", "0", "yes", "no", "true", "false", "on", "off", "t", "f", "y", "n"}
    for word, value in words.items():
        for spelled in (word, word.upper(), word.capitalize()):
            assert yamlschema.as_bool(spelled) is value
    assert yamlschema.as_bool(True) is True and yamlschema.as_bool(False) is False
    for other in ("", "maybe", "2", None, 1, 0, 1.0, ["yes"]):
        with pytest.raises(ValueError):
            yamlschema.as_bool(other)


def test_a_python_caller_s_numpy_numbers_are_read_as_before():
    """Review of session 36 (helper-157): FinetuneConfig.from_dict (the Python API's, and load_resume_config's with
    a caller's overrides) took a grid's numpy numbers (`epochs: np.int64(5)`, `lr: np.float32(1e-3)`) and gave
    Python numbers (int(), float()); through the new readers they were "should be a whole number". A number of
    any type that Python's numbers module calls one is read; a boolean still is no number."""
    import numpy as np

    from finetune.core.config import FinetuneConfig

    config = FinetuneConfig.from_dict({"epochs": np.int64(5), "batch_size": np.int32(8), "lr": np.float32(0.5),
                                       "weight_decay": np.float64(0.0), "warmup_epochs": np.int64(1)})
    assert (config.epochs, config.batch_size, config.lr, config.weight_decay, config.warmup_epochs) == (5, 8, 0.5,
                                                                                                       0.0, 1.0)
    assert all(type(getattr(config, k)) is type(FinetuneConfig().__getattribute__(k))
               for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs"))
    assert yamlschema.as_int(np.float32(3.0)) == 3
    for other in (np.bool_(True), np.float32(2.5)):
        with pytest.raises(ValueError):
            yamlschema.as_int(other)
    with pytest.raises(ValueError):
        yamlschema.as_float(np.bool_(False))
