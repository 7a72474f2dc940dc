"""Option definitions: one table (finetune.core.config.OPTIONS) behind `zoo finetune`, `lr-find` and `sweep`;
every numeric option refused outside its range with one line (exit 2) before a run folder is written."""
from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from click.testing import CliRunner

from finetune.core.config import OPTIONS, FinetuneConfig
from finetune.core.errors import ConfigError
from tests.conftest import make_image_folder
from zoo.cli import cli

NONSENSE = [("--gamma", "-1"), ("--weight-decay", "-1"), ("--momentum", "2"), ("--patience", "-1"),
            ("--step-size", "0"), ("--aug-views", "-3"), ("--workers", "-5"), ("--overfit-batches", "-1"),
            ("--warmup-epochs", "-2"), ("--ema", "-0.5"), ("--head-epochs", "-7"), ("--lr", "-1e-3"), ("--val-split", "1"),
            ("--batch-size", "0"), ("--mlp-dropout", "1"), ("--backbone-lr-mult", "-0.1"), ("--seed", "-1"),
            ("--label-smoothing", "1"), ("--mixup", "-1"), ("--cutmix", "-0.2"), ("--seed", str(2**63)),
            # QA session 22: 100000 worker processes (a mistyped 10) were started as asked, each a copy of torch
            ("--workers", "100000")]


def _numeric_fields() -> list[str]:
    defaults = FinetuneConfig()
    return [f.name for f in dataclasses.fields(FinetuneConfig)
            if isinstance(getattr(defaults, f.name), (int, float)) and not isinstance(getattr(defaults, f.name), bool)]


def test_one_definition_per_field_with_a_range_for_every_number():
    assert set(OPTIONS) == {f.name for f in dataclasses.fields(FinetuneConfig)}
    for name in _numeric_fields():
        assert OPTIONS[name].range_text(), f"{name} has no allowed range"


@pytest.mark.parametrize("flag,value", NONSENSE)
def test_nonsense_numbers_exit_2_before_any_run_folder(tmp_path, flag, value):
    data = make_image_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["finetune", "resnet18", "--data", str(data), "--out", str(out), flag, value])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0] and "allowed:" in lines[0], r.output
    assert OPTIONS[flag[2:].replace("-", "_")].range_text() in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("command", ["finetune", "lr-find"])
def test_a_batch_size_torch_cannot_take_is_refused_in_one_line(tmp_path, command):
    """QA session 22: --batch-size 1e20 (or batch_size: 100000000000000000000 in a --config) passed the range and
    was a ValueError traceback from torch's sampler in the cached head's batches (lr-find; finetune with
    --head-solver gradient, after the run folder was written). The bound is in OPTIONS, as the seed's is."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "out"
    extra = ["--head-solver", "gradient"] if command == "finetune" else []
    r = CliRunner().invoke(cli, [command, "resnet18", "--data", str(data), "--out", str(out), "--batch-size", str(10**20),
                                 *extra])
    assert r.exit_code == 2 and not out.exists(), r.output
    assert r.output.strip() == f"zoo: error: invalid batch_size={10**20} (--batch-size): allowed: 1 <= x < 2**63"


@pytest.mark.parametrize("command", ["sweep", "lr-find"])
def test_a_seed_torch_cannot_take_is_refused_in_one_line(tmp_path, command):
    """QA: --seed 2**63 was a traceback (torch's manual_seed overflowed); the bound is in OPTIONS, so every
    command built from it refuses it, and a seed past float's range too (it was compared as a float)."""
    data = make_image_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "out"
    for seed in (2**63, 10**400):
        r = CliRunner().invoke(cli, [command, "resnet18", "--data", str(data), "--out", str(out), "--seed", str(seed)])
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"zoo: error: invalid seed={seed} (--seed): allowed: 0 <= x < 2**63")
        assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_the_largest_seed_runs_and_its_derived_seeds_fit_torch(tmp_path, monkeypatch):
    """2**63 - 1 trains (the fast head's per-view seeds were seed * 1_000_003 + view, past torch's 2**64)."""
    from finetune.core.seeding import epoch_seed, sample_seed, view_pick_seed, view_seed
    from tests.conftest import register_tiny

    top = 2**63 - 1
    assert max(view_seed(top, 7), view_pick_seed(top, 99), epoch_seed(top, 99, 7), sample_seed(top, 10**6)) < 2**63
    tiny = register_tiny(tmp_path, monkeypatch)
    data = make_image_folder(tmp_path / "data", per_class=4)
    r = CliRunner().invoke(cli, ["finetune", tiny, "--data", str(data), "--out", str(tmp_path / "run"), "--seed",
                                 str(top), "--aug-views", "2", "--epochs", "1", "--workers", "0", "--device", "cpu",
                                 "--quiet"])
    assert r.exit_code == 0, r.output


def test_sentinels_stay_valid():
    FinetuneConfig(workers=-1, head_epochs=-1, patience=0, aug_views=0, overfit_batches=0, warmup_epochs=0.5)
    FinetuneConfig(warmup_epochs=-1, ema=-1)      # auto


def test_yaml_values_are_checked_the_same_way(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump({"momentum": 2.0}))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["finetune", "resnet18", "--data", str(data), "--out", str(out),
                                 "--config", str(cfg)])
    assert r.exit_code == 2 and "momentum" in r.output and "0 <= x < 1" in r.output and not out.exists()
    with pytest.raises(ConfigError, match=r"invalid gamma=1.5 .*plateau"):
        FinetuneConfig(schedule="plateau", gamma=1.5)


def test_a_config_in_utf16_is_read_and_one_in_no_text_encoding_is_one_line(tmp_path):
    """QA (helper-53): a config saved by Windows Notepad as "Unicode" (UTF-16 with a byte-order mark) or a binary
    file given as --config was a UnicodeDecodeError traceback. UTF-16/32 with a mark and UTF-8 with one are read;
    anything else is one line that says what to do, before any run folder."""
    from finetune.core.config import read_config_file

    for codec in ("utf-16", "utf-8-sig", "utf-32"):
        (tmp_path / "c.yaml").write_bytes("epochs: 3\nlr: 0.01  # é\n".encode(codec))
        config = read_config_file(tmp_path / "c.yaml")[0]
        assert (config.epochs, config.lr) == (3, 0.01), codec
    data = make_image_folder(tmp_path / "data", per_class=2)
    (tmp_path / "c.yaml").write_bytes(bytes(range(128, 256)))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["finetune", "resnet18", "--data", str(data), "--out", str(out),
                                 "--config", str(tmp_path / "c.yaml")])
    assert r.exit_code == 2 and not out.exists() and isinstance(r.exception, (type(None), SystemExit)), r.output
    assert "is not UTF-8 text (nor UTF-16/32 with a byte-order mark): save it as UTF-8" in r.output


@pytest.mark.parametrize("text,message", [
    ("epochs: 2.5", "epochs='2.5' should be a whole number"),      # (a file's values are its text, helper-152)
    ("lr: true", "lr='true' should be a number"),
    ("patience: yes", "patience='yes' should be a whole number"),     # (text since helper-143: YAML 1.1 read True)
    ("tensorboard: 3", "tensorboard='3' should be true or false"),
    ("lr: auto", "lr='auto' should be a number; auto is taken on the command line only (--lr auto): in a file "
                 "give the learning rate, e.g. lr: 0.001"),
    ("lr: Auto", "lr='Auto' should be a number; auto is taken on the command line only (--lr auto)")])
def test_yaml_values_of_the_wrong_type_are_refused_not_converted(tmp_path, text, message):
    """int()/float() took `epochs: 2.5` as 2 and `lr: true` as 1.0 without a word. QA: the messages said
    "should be a int" (Python's type names), and `lr: auto` gave no hint that auto is a command-line value."""
    from finetune.core.config import read_config_file

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(text + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{cfg}: {message}")):
        read_config_file(cfg)
    cfg.write_text("epochs: 3.0\nlr: 1\nhead_epochs: '2'\n")       # whole numbers and numeric text still do
    config = read_config_file(cfg)[0]
    assert (config.epochs, config.lr, config.head_epochs) == (3, 1.0, 2)



def test_a_key_given_twice_in_a_config_is_refused_naming_both_lines(tmp_path):
    """QA session 22: PyYAML keeps the last of two equal keys without a word, so a recipe with `lr: 0.01` at the
    top and a forgotten `lr: 0.5` further down trained at 0.5. Now one line naming both lines, before any run
    folder; a merge key (`<<: *base`) may still be overridden, as YAML means it."""
    from finetune.core.config import read_config_file

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("lr: 0.01\nepochs: 2\nlr: 0.5\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"{cfg} is not valid YAML at line 3, column 1: lr is given twice (lines 1 and 3), and only the last "
            "would count: keep one; fix the file")):
        read_config_file(cfg)
    data = make_image_folder(tmp_path / "data", per_class=2)
    r = CliRunner().invoke(cli, ["finetune", "resnet18", "--data", str(data), "--out", str(tmp_path / "run"),
                                 "--config", str(cfg)])
    assert r.exit_code == 2 and not (tmp_path / "run").exists() and "given twice" in r.output, r.output
    cfg.write_text("<<: {lr: 0.01, epochs: 2}\nlr: 0.02\n")
    config = read_config_file(cfg)[0]
    assert (config.lr, config.epochs) == (0.02, 2)


def test_a_config_value_made_of_nested_aliases_is_refused_at_once(tmp_path):
    """QA session 22: `lr: [*h, *h, ...]`, aliases nine deep (a few lines: a "billion laughs"), was printed whole
    in the "should be a number" line: minutes and 7 GB, then killed. It is now shown cut short, and a list is no
    text for an option that takes text (it was turned into its repr)."""
    import time

    from finetune.core.config import read_config_file

    lines = ["lr:", "  - &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=re.escape(f"{cfg}: lr=[['x', 'x', 'x', 'x', ...], [[...]") + ".* should be a number"):
        read_config_file(cfg)
    assert time.perf_counter() - start < 5
    cfg.write_text("device: [cpu]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{cfg}: device=['cpu'] should be auto, cpu, cuda, cuda:N or mps")):
        read_config_file(cfg)

def test_every_option_type_has_a_word_in_the_messages():
    from finetune.core.config import _KIND_WORDS

    assert {type(f.default) for f in dataclasses.fields(FinetuneConfig)} <= set(_KIND_WORDS)


@pytest.mark.parametrize("text,message", [
    ("batch-size: 8", "unknown option(s) batch-size (did you mean batch_size?); keys are the option names with "
                      "underscores"),
    ("Lr: 0.1\nmomentom: 0.5", "unknown option(s) Lr, momentom (did you mean lr, momentum?)"),
    # QA: sorting a number (or null) key with a text one raised TypeError, a traceback
    ("1: 2\nfoo: 3", "unknown option(s) 1, foo; keys are"), ("null: 1\nlr: 0.1", "unknown option(s) None; keys")])
def test_unknown_yaml_keys_name_the_option_meant(tmp_path, text, message):
    from finetune.core.config import read_config_file

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(text + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{cfg}: {message}")):
        read_config_file(cfg)


@pytest.mark.parametrize("text,message", [
    # a run's config.yaml written by a zoo from before --augment took a mode (31e7fd3): `zoo finetune --resume`
    ("augment: true", "invalid augment='true' (--augment): choose one of standard, trivial, none"),
    ("epochs: -3", "invalid epochs=-3 (--epochs): allowed: x >= 1 or 0"),
    # QA session 22: `invalid device='gpu': ...` named neither the file nor the option (checked when resolved)
    ("device: gpu", "invalid device='gpu' (--device): use auto, cpu, cuda, cuda:N or mps")])
def test_a_value_a_yaml_file_gives_out_of_range_names_the_file(tmp_path, text, message):
    """QA: a --config file's or a resumed run's config.yaml value out of range was `invalid augment='True'
    (--augment): ...`, naming a flag the user never gave, not the file to fix."""
    from finetune.core.config import read_config_file

    cfg = tmp_path / "config.yaml"
    cfg.write_text(text + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{cfg}: {message}")):
        read_config_file(cfg)


@pytest.mark.parametrize("device", ["cpu:0", "mps:0", "CUDA:1", " cuda ", "auto"])
def test_a_device_torch_takes_still_passes_the_spelling_check_in_a_run_config(tmp_path, device):
    """Review of QA session 22: 905a16b's spelling check refused `cpu:0` and `mps:0`, which torch (and zoo before)
    take: a run started with --device cpu:0 could no longer be resumed, its config.yaml refused."""
    from finetune.core.config import FinetuneConfig, read_config_file, save_config

    save_config(FinetuneConfig(device=device), tmp_path / "config.yaml")
    assert read_config_file(tmp_path / "config.yaml")[0].device == device


@pytest.mark.parametrize("command", ["finetune", "lr-find", "sweep"])
def test_help_shows_ranges_and_the_same_options(command):
    r = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "--decode [workers|device]" in text                   # lr-find/sweep had lost it
    assert "[default: 0.9; 0 <= x < 1]" in text and "[default: -1; 0 <= x <= 512 or -1]" in text   # momentum, workers


def test_min_delta_says_its_unit_now_that_accuracies_print_in_percent():
    """The epoch lines say "val acc 98.64%"; --min-delta 0.5 read as half a point is half the scale for val_acc
    (no epoch ever improves): its help says the unit (helper-74)."""
    r = CliRunner().invoke(cli, ["finetune", "--help"], terminal_width=200)
    text = " ".join(r.output.split())
    assert "smallest change that counts as an improvement (val_acc: a fraction, 0.001 = 0.1 point)" in text


def test_lr_find_refuses_nonsense_before_writing(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "lr"
    r = CliRunner().invoke(cli, ["lr-find", "resnet18", "--data", str(data), "--out", str(out), "--momentum", "2"])
    assert r.exit_code == 2 and "--momentum" in r.output and not out.exists()
    for flag, value in (("--end-lr", "inf"), ("--start-lr", "nan"), ("--smooth", "nan"), ("--diverge-factor", "inf")):
        r = CliRunner().invoke(cli, ["lr-find", "resnet18", "--data", str(data), "--out", str(out), flag, value])
        assert r.exit_code == 2 and f"({flag}): allowed: " in r.output and "a finite number" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("args,expected", [([], "standard"), (["--augment", "trivial"], "trivial"),
                                           (["--augment", "none"], "none")])
def test_augment_takes_a_mode(args, expected):
    """``--augment MODE``, a closed set like every other choice; the old switch spellings (a bare
    ``--augment``, ``--no-augment``) are gone. Only what was given on the command line overrides a
    --config file (given_options)."""
    import click

    from zoo.cli.options import config_options, given_options

    seen = {}

    @click.command()
    @config_options()
    @click.pass_context
    def probe(ctx, **values):
        seen.update(value=values["augment"], given=given_options(ctx, values))

    r = CliRunner().invoke(probe, args)
    assert r.exit_code == 0, r.output
    assert seen["value"] == expected
    assert ("augment" in seen["given"]) is bool(args)
    for old in (["--no-augment"], ["--augment"]):
        r = CliRunner().invoke(probe, old)
        assert r.exit_code == 2, (old, r.output)


@pytest.mark.parametrize("code,says", [
    ("ENOSPC", "no space left on device while writing (/out/x): free some disk space or write elsewhere"),
    ("EDQUOT", "while writing (/out/x): write elsewhere (--out, ZOO_HOME) or free some space under your quota"),
    ("EFBIG", "File too large while writing (/out/x): write elsewhere (--out, ZOO_HOME)"),
    ("EROFS", "Read-only file system while writing (/out/x): write elsewhere (--out, ZOO_HOME)"),
    ("EACCES", "Permission denied (/out/x): this user may not use that path; change its permissions (or ask its "
               "owner), or choose another (--out, ZOO_HOME)"),
    ("ENOEXEC", "Exec format error (/out/x); set ZOO_DEBUG=1 for details"),
])
def test_a_write_that_finds_no_room_says_where_and_what_to_do(code, says, monkeypatch):
    """One test of "no room here" (finetune.core.io.no_room, which the cache's downloads use too): the CLI
    turns it into one line naming the file and saying to write elsewhere; a read-only mount is not told
    to free space, nor a file-size limit; other OS errors stay plain."""
    import errno
    import os

    import click

    from zoo.cli.app import ZooGroup

    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    group = ZooGroup()

    @group.command()
    def boom():
        number = getattr(errno, code)
        raise OSError(number, os.strerror(number), "/out/x")

    assert isinstance(group, click.Group)
    res = CliRunner().invoke(group, ["boom"])
    assert res.exit_code == 1
    line, = res.output.strip().splitlines()
    assert line.startswith("zoo: error: ") and says in line, line
    if code in ("EROFS", "EFBIG"):     # freeing space would not help
        assert "free" not in line


def test_a_config_key_written_otherwise_at_its_default_chooses_nothing(tmp_path):
    """A --config key counts as chosen (for the 'has no effect' notes) when its value differs from the default
    as the option reads it: PyYAML reads `2e-1` (no dot) and `'512'` as text, which the config takes as 0.2
    and 512, the defaults; compared as read they were called choices ('--mlp-dropout, --mlp-hidden shape the
    MLP head')."""
    from zoo.cli.options import resolve_config

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("mlp_dropout: 2e-1\nmlp_hidden: '512'\nmlp_activation: relu\n")
    config, _, notes = resolve_config(None, str(cfg), {}, True, given={})
    assert (config.mlp_dropout, config.mlp_hidden) == (0.2, 512) and notes == []
    cfg.write_text("mlp_dropout: 3e-1\n")       # another value is a choice, however it is written
    assert "--mlp-dropout" in resolve_config(None, str(cfg), {}, True, given={})[2][0]


def test_a_resume_free_option_out_of_bounds_in_a_saved_config_gives_way_to_the_flag_or_the_default(tmp_path):
    """helper-63: a run whose config.yaml holds workers: 1000 (an older version's, or edited) could not be resumed
    without editing the file. workers changes no maths: the value given now, else the default, replaces it with
    one note; an option that does change the maths (lr) still refuses."""
    from finetune.core.config import load_resume_config

    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump({**FinetuneConfig(epochs=3).to_dict(), "workers": 1000}))
    config, notes = load_resume_config(conf)
    assert config.workers == -1 and config.epochs == 3
    assert notes == [f"{conf}: workers=1000 is out of bounds (allowed: 0 <= x <= 512 or -1); this resume uses "
                     "workers=-1 (the default)"]
    config, notes = load_resume_config(conf, {"workers": 2, "epochs": 5})
    assert (config.workers, config.epochs) == (2, 5) and len(notes) == 1 and notes[0].endswith("workers=2 (given now)")
    conf.write_text(yaml.safe_dump({**FinetuneConfig().to_dict(), "workers": 4}))
    assert load_resume_config(conf) == (FinetuneConfig(workers=4), [])
    conf.write_text(yaml.safe_dump({**FinetuneConfig().to_dict(), "workers": 1000, "lr": -1.0}))
    with pytest.raises(ConfigError, match=r"invalid lr=-1.0"):
        load_resume_config(conf)


@pytest.mark.parametrize("saved,given", [({"decode": "device", "augment": "trivial"}, {"decode": "workers"}),
                                         ({"device": "gpu"}, {"device": "cpu"})])
def test_a_resume_free_flag_given_now_settles_a_rule_its_saved_value_breaks(tmp_path, saved, given):
    """Review of helper-63's load_resume_config: a saved config.yaml whose resume-free option breaks a rule of
    validate() other than its own range (decode: device beside augment: trivial, or device: gpu, edited) still
    blocked the resume when the flag the message asks for was given to it (--decode workers): the file was
    checked alone before the options given now. The resume-free flag given now settles it; alone, the file's
    error stands, naming the file."""
    from finetune.core.config import load_resume_config

    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump({**FinetuneConfig().to_dict(), **saved}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(conf))}: invalid "):
        load_resume_config(conf)
    config, notes = load_resume_config(conf, given)
    assert {k: getattr(config, k) for k in given} == given and notes == []
    assert all(getattr(config, k) == v for k, v in saved.items() if k not in given)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(conf))}: invalid "):   # an invalid flag settles nothing
        load_resume_config(conf, {**given, "workers": 2000})


def test_every_command_shows_an_allowed_range_in_one_form():
    """QA: `--help` showed a bounded option three ways: the config's `[x >= 0]  [default: 50]`, click's
    `[default: 5; x>=1]` (with an INTEGER RANGE metavar) and hand-written ones (`[0 <= x < 1; default: ...]`,
    `[default: the --config file's, else 5]  [x>=1]`). Every option now ends `[default: D; RANGE]`, the range in
    finetune.core.config.range_text's form, its metavar the plain type's."""
    from zoo.cli.options import IntRange

    for name in cli.commands:
        text = CliRunner().invoke(cli, [name, "--help"]).output
        options = " ".join(text.split("Options:", 1)[1].split())
        assert not re.search(r"\d(<=|<|>=|>)x|x(<=|<|>=|>)\d", options), (name, options)    # click's "x>=1"
        assert "] [" not in options and "RANGE" not in options, (name, options)
    finetune_help = " ".join(CliRunner().invoke(cli, ["finetune", "--help"]).output.split())
    assert "[default: 50; x >= 0]" in finetune_help and "[default: 0.5 for VGG; 0 <= x < 1]" in finetune_help
    sweep_help = " ".join(CliRunner().invoke(cli, ["sweep", "--help"]).output.split())
    assert "--epochs INTEGER Epochs per trial. [default: the --config file's, else 5; x >= 1]" in sweep_help
    r = CliRunner().invoke(cli, ["predict", "resnet18", "x.jpg", "--topk", "0"])      # click's own message too
    assert r.exit_code == 2 and "0 is not in the range x >= 1" in r.output, r.output
    assert IntRange(0, 9)._describe_range() == "0 <= x <= 9"


def test_the_commands_log_through_one_sayer_one_visible_line_a_message_and_none_when_quiet(capsys):
    """finetune, doctor, lr-find and sweep log their progress through zoo.cli.shared.sayer (helper-90: finetune
    and doctor had their own copies): a message with a newline in it (a class name) is one line on stderr,
    nothing on stdout, and nothing at all when quiet (finetune: on a rank other than 0)."""
    from zoo.cli import doctor, finetune as finetune_cmd, shared

    shared.sayer(quiet=False)("class a\nb: 3 images")
    shared.sayer(quiet=True)("not shown")
    out, err = capsys.readouterr()
    assert (out, err) == ("", "class a\\nb: 3 images\n")
    assert doctor.sayer is shared.sayer and finetune_cmd.sayer is shared.sayer
