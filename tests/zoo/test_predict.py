"""zoo.predict and zoo.evaluate: ten-crop TTA, batched prediction with skipped images, metrics, eval folders and reports."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.scan import scan_folder
from tests.conftest import fifo_with_a_late_writer, make_image, make_image_folder
from zoo.errors import UsageError
from zoo.evaluate import classification_metrics, evaluate, find_eval_images, write_eval_reports
from zoo.predict import expand_images, parse_scales, predict_probs, topk, tta_transform

# the repository root: subprocesses import this checkout's zoo, whichever folder pytest runs from
ROOT = Path(__file__).resolve().parents[2]

DC = {"input_size": (3, 8, 8), "interpolation": "bilinear", "crop_pct": 0.8, "crop_mode": "center",
      "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


class MeanColour(torch.nn.Module):
    """A 3-class 'model': logits are the mean of each channel (so predictions are predictable)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * self.scale


def _gradient(w: int = 10, h: int = 10) -> Image.Image:
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 25      # red grows left -> right
    a[..., 1] = np.arange(h, dtype=np.uint8)[:, None] * 25      # green grows top -> bottom
    return Image.fromarray(a)


def test_ten_crop_views_are_corners_centre_and_flips():
    views = tta_transform(DC)(_gradient())       # resize shorter side to floor(8 / 0.8) = 10: no-op here
    assert views.shape == (10, 3, 8, 8)
    red = views[:, 0]
    # torchvision order: tl, tr, bl, br, centre of the image, then of its mirror image
    assert red[0, 0, 0] < red[1, 0, 0]                      # right corners see more red
    assert views[0, 1, 0, 0] < views[2, 1, 0, 0]            # bottom corners see more green
    assert torch.allclose(views[5], views[1].flip(-1))      # mirror's top-left = flipped top-right
    assert torch.allclose(views[8], views[2].flip(-1))      # mirror's bottom-right = flipped bottom-left
    assert torch.allclose(views[9], views[4].flip(-1))      # flip of centre


def test_multi_scale_tta_stacks_ten_views_per_scale():
    views = tta_transform(DC, scales=[8, 12, 16])(_gradient(20, 30))
    assert views.shape == (30, 3, 8, 8)
    with pytest.raises(UsageError, match="smaller than the model's input size"):
        tta_transform(DC, scales=[4])


def test_ten_crop_tta_of_a_thin_strip_stays_small(monkeypatch):
    """QA (helper-53): ten-crop TTA resized a 20000x2 strip's short side to the scale, a 20M x 2048 intermediate
    (17 GB, the process killed); its long side is first cut to twice the short, as validation cuts it."""
    from torchvision.transforms import functional as F

    from zoo import predict

    sizes = []
    real = F.resize
    monkeypatch.setattr(predict.F, "resize", lambda img, size, **kw: sizes.append(img.size) or real(img, size, **kw))
    views = tta_transform(DC, scales=[8, 2048])(Image.new("RGB", (20000, 2)))
    assert views.shape == (20, 3, 8, 8) and sizes == [(16, 2), (16, 2)]
    sizes.clear()
    assert tta_transform(DC, scales=[8])(Image.new("RGB", (300, 100))).shape == (10, 3, 8, 8)
    assert sizes == [(300, 100)]      # a 3:1 panorama whole: its corner crops reach its corners


def test_parse_scales():
    assert parse_scales("224, 256,288") == (224, 256, 288)
    assert parse_scales(None) is None
    assert parse_scales("2048") == (2048,) and len(parse_scales(",".join(["224"] * 8))) == 8
    for bad in ("a,b", "0", "-3", "100000", "224,2049", ",".join(["224"] * 9)):
        with pytest.raises(UsageError):
            parse_scales(bad)


def test_predict_probs_tta_is_the_mean_of_crop_probabilities():
    model = MeanColour().eval()
    img = _gradient(16, 12)
    kept, probs = predict_probs(model, [img], DC, tta=True, tta_scales=[8, 12])
    views = tta_transform(DC, [8, 12])(img)
    with torch.no_grad():
        want = model(views).softmax(-1).mean(0)
    assert kept == [0] and torch.allclose(probs[0], want, atol=1e-6)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_predict_probs_batches_and_skips_unreadable(tmp_path):
    model = MeanColour().eval()
    good = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (12, 12), colour).save(p)
        good.append(p)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    seen: list[tuple[str, str]] = []
    kept, probs = predict_probs(model, [good[0], broken, good[1], good[2]], DC, batch_size=2,
                                on_error=lambda item, why: seen.append((str(item), why)))
    assert kept == [0, 2, 3]
    assert [str(broken)] == [s for s, _ in seen] and seen[0][1]
    assert probs.argmax(1).tolist() == [0, 1, 2]                       # red, green, blue
    labels = ["red", "green", "blue"]
    assert [r[0][0] for r in topk(probs, labels, 2)] == labels
    with pytest.raises(Exception):
        predict_probs(model, [broken], DC)                              # without on_error it propagates


def test_predict_and_eval_decode_on_the_loaders_worker_count(monkeypatch):
    """One worker policy (finetune.data.loaders.resolve_workers) for the training loaders and for predict's and
    eval's decoding threads: what it says for the model's device is what predict_probs uses."""
    import zoo.predict as predict

    asked: list[str] = []
    used: list[int] = []
    real = predict._prepared
    monkeypatch.setattr(predict, "resolve_workers", lambda workers, device: asked.append(device) or 2)
    monkeypatch.setattr(predict, "_prepared", lambda images, prepare, threads, batch: used.append(threads) or
                        real(images, prepare, threads, batch))
    img = Image.new("RGB", (12, 12), (255, 0, 0))
    assert predict_probs(MeanColour().eval(), [img, img, img], DC)[0] == [0, 1, 2]
    assert predict_probs(MeanColour().eval(), [img, img], DC)[0] == [0, 1]      # never more threads than images
    assert predict_probs(MeanColour().eval(), [img], DC)[0] == [0]              # none for one: nothing to overlap
    assert asked == ["cpu"] * 3 and used == [2, 1, 0]


@pytest.mark.parametrize("tta", [False, True])
def test_images_decoded_on_threads_give_the_same_probabilities_errors_and_order(tmp_path, tta):
    """On a GPU machine predict and eval decode on threads (the loaders' worker count: resolve_workers); here,
    on 3 threads, the result is that of decoding one image after another: the same probabilities to the bit,
    the same images kept, the same unreadable ones reported in input order, and without on_error the first
    unreadable image's error."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(23):
        p = tmp_path / f"img{i:02d}.png"
        if i in (4, 11, 12):
            p.write_bytes(b"not an image at all" * i)
        else:
            Image.fromarray(rng.integers(0, 255, (9 + i, 14, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    runs = {}
    for threads in (0, 3):
        seen: list[str] = []
        kept, probs = predict_probs(MeanColour().eval(), paths, DC, batch_size=4, tta=tta, threads=threads,
                                    on_error=lambda item, why: seen.append(str(item)))
        runs[threads] = (kept, probs, seen)
        with pytest.raises(Exception, match="img04"):
            predict_probs(MeanColour().eval(), paths, DC, batch_size=4, threads=threads)
    assert runs[0][0] == runs[3][0] == [i for i in range(23) if i not in (4, 11, 12)]
    assert torch.equal(runs[0][1], runs[3][1])
    assert runs[0][2] == runs[3][2] == [str(paths[i]) for i in (4, 11, 12)]


def test_decoding_threads_read_under_the_pil_filters_and_leave_the_process_filters_as_they_were(monkeypatch):
    """Review (helper-85): load_image's pil_warnings is catch_warnings, which is not thread-safe; entered on each
    decoding thread, one thread restored the filters another had set: after a threaded predict the process kept
    'error' for PIL's decompression-bomb warning (5 runs of 200 images on 4 threads: 2 filters left over each time),
    and a decode could run without it. The filters are now set once around the threads: each thread finds them
    set before it reads, and the process's own filters come back."""
    import warnings

    import zoo.predict as predict

    before = list(warnings.filters)
    bombs_refused: list[bool] = []

    def load(item, size):      # what a decoding thread finds before load_image enters its own filters
        bombs_refused.append(any(f[0] == "error" and f[2] is Image.DecompressionBombWarning for f in warnings.filters))
        return item

    monkeypatch.setattr(predict, "_load", load)
    img = Image.new("RGB", (12, 12), (255, 0, 0))
    assert predict_probs(MeanColour().eval(), [img] * 6, DC, batch_size=2, threads=2)[0] == list(range(6))
    assert bombs_refused == [True] * 6
    assert warnings.filters == before


def test_a_pil_image_given_more_than_once_is_loaded_on_one_thread_at_a_time():
    """Review (helper-85): a PIL image opened lazily (Image.open) and given several times (bundle.predict([im] * 8))
    was loaded from its file by several decoding threads at once: 3-4 of 8 came back unreadable (AssertionError,
    "broken data stream"). Loads now take turns; every copy gets the probabilities of one image after another."""
    import time

    at_once: list[int] = []
    loading, loaded = [0], [False]
    img = Image.new("RGB", (12, 12), (255, 0, 0))

    def load():            # a lazy image: how many threads are inside its first load (a pause invites a second)
        if not loaded[0]:
            loading[0] += 1
            at_once.append(loading[0])
            time.sleep(0.05)
            loading[0] -= 1
            loaded[0] = True
        return Image.Image.load(img)

    img.load = load
    kept, probs = predict_probs(MeanColour().eval(), [img] * 8, DC, batch_size=4, threads=4)
    assert kept == list(range(8)) and max(at_once) == 1
    assert torch.equal(probs, predict_probs(MeanColour().eval(), [img] * 8, DC, batch_size=4, threads=0)[1])


def test_a_stream_among_the_images_is_read_on_the_calling_thread(tmp_path, monkeypatch):
    """Review (helper-85): `sleep 40 | zoo predict BUNDLE - a.jpg` on decoding threads: a Ctrl-C printed
    "zoo: interrupted" and then waited on, the pool's thread joined while it read the pipe, until its writer
    ended. A stream (/dev/stdin, <(...)'s /dev/fd/N) is now read without threads, where a Ctrl-C interrupts it."""
    import zoo.predict as predict

    used: list[int] = []
    real = predict._prepared
    monkeypatch.setattr(predict, "_prepared", lambda images, prepare, threads, batch: used.append(threads) or
                        real(images, prepare, threads, batch))
    png = tmp_path / "a.png"
    Image.new("RGB", (12, 12), (255, 0, 0)).save(png)
    for stream in ("/dev/null", Path("/dev/null")):      # (read: nothing; stdin might be a terminal)
        kept, _ = predict_probs(MeanColour().eval(), [png, stream, png], DC, threads=2, on_error=lambda *a: None)
        assert kept == [0, 2]
    predict_probs(MeanColour().eval(), [png, png, png], DC, threads=2)
    assert used == [0, 0, 2]


def test_a_consumer_that_stops_early_leaves_no_decoding_behind():
    """predict's decode-ahead threads stop with their consumer (an error or Ctrl-C between batches): the images
    queued ahead are cancelled, and no thread of the pool outlives the generator."""
    import threading

    from zoo.predict import _prepared

    started: list[int] = []

    def prepare(i: int) -> torch.Tensor:
        started.append(i)
        return torch.tensor([i])

    gen = _prepared(list(range(1000)), prepare, 2, 4)
    assert [int(next(gen)[1]) for _ in range(3)] == [0, 1, 2]
    gen.close()
    assert len(started) < 20
    assert not [t for t in threading.enumerate() if t.name.startswith("zoo-decode")]


def test_expand_images_recurses_folders_and_rejects_missing(tmp_path):
    make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    (tmp_path / "d" / "notes.txt").write_text("x")
    paths, any_dir = expand_images([tmp_path / "d"])
    assert any_dir and len(paths) == 4 and all(p.suffix == ".png" for p in paths)
    with pytest.raises(UsageError, match="no such image"):
        expand_images([tmp_path / "missing.jpg"])
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "moved.jpg")      # QA: was "no such image or folder"
    with pytest.raises(UsageError, match=r"gone.jpg is a symbolic link to .*moved.jpg, which does not exist .*; fix or "
                                         r"remove it$"):
        expand_images([tmp_path / "gone.jpg"])
    # one wording with every other command (finetune.core.io.broken_link): a loop, and an image below a link to nothing
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    with pytest.raises(UsageError, match=r"loop.jpg is a symbolic link that loops .*; fix or remove it$"):
        expand_images([tmp_path / "loop.jpg"])
    (tmp_path / "disk").symlink_to(tmp_path / "unmounted")
    with pytest.raises(UsageError, match=r"disk is a symbolic link to .*unmounted, which does not exist"):
        expand_images([tmp_path / "disk" / "cat.jpg"])


def test_an_empty_image_argument_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch):
    """QA (h72): `zoo predict BUNDLE "$IMG"`, IMG unset, predicted every image below the current folder (Path("")
    is "."): from a home folder, every photo in it. `.` still means the current folder."""
    make_image_folder(tmp_path, classes=("a",), per_class=2, size=16)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"an image argument is empty \(an unset shell variable\?\): give an "
                                         r"image or a folder \(\. for the current one\)"):
        expand_images([tmp_path / "a" / "a_000.png", ""])
    assert len(expand_images(["."])[0]) == 2
    from click.testing import CliRunner  # lazy: the one CLI case of this module

    from zoo.cli import cli  # lazy: as above
    r = CliRunner().invoke(cli, ["predict", "no-such-bundle", ""])   # the images are expanded before the model
    assert r.exit_code == 2 and r.output.startswith("zoo: error: an image argument is empty") \
        and len(r.output.splitlines()) == 1, r.output


def test_a_folder_zoo_wrote_given_for_images_is_named_so_not_called_empty(tmp_path, monkeypatch):
    """Review (h77): since the folder walk skips folders holding zoo's marker, `zoo predict B RUN` (a run folder,
    its curves.png in it) said `no images found in RUN`, and `zoo eval B --data RUN` `no class folder matches
    the model's labels (found: eval-a, ...)`, with no word of why; the training scan names it a folder zoo wrote.
    All three say so now (finetune.data.files.refuse_zoo_output); a file in it, or a pattern, is still read."""
    from click.testing import CliRunner  # lazy: one CLI case

    from finetune.core.errors import DataError
    from zoo.cli import cli  # lazy: as above

    run = tmp_path / "run"
    for name in ("curves.png", "eval-a/a/confusion.png"):
        make_image(run / name, 0, size=16)
    for folder in (run, run / "eval-a"):
        (folder / ".zoo-run.json").write_text('{"kind": "eval"}')
    for given in (run, run / "eval-a"):
        with pytest.raises(DataError, match=r"is a folder zoo wrote \(a run, bundle or report\), not images to "
                                            r"classify: give the folder of the images, or name its files"):
            expand_images([given])
    with pytest.raises(DataError, match=r"run is a folder zoo wrote \(a run, bundle or report\), not images to "
                                        r"evaluate on: pass --data the held-out images' folder"):
        find_eval_images(run, ["a", "b"])
    assert expand_images([run / "curves.png"])[0] == [run / "curves.png"]
    assert expand_images([str(run / "*.png")])[0] == [run / "curves.png"]
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["predict", "no-such-bundle", "run"])    # the images are expanded before the model
    assert r.exit_code == 1 and r.output.startswith("zoo: error: run is a folder zoo wrote") \
        and len(r.output.splitlines()) == 1, r.output
    assert r.output.rstrip().endswith("(it holds .zoo-run.json, which zoo writes first into its output; if the "
                                      "folder is yours, delete that file)"), r.output


def test_a_quoted_glob_pattern_is_expanded_to_its_image_files(tmp_path):
    """QA: `zoo predict B 'photos/*/*.png'` (quoted, so the shell leaves it) said "no such image or folder"."""
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    (root / "a" / "notes.txt").write_text("x")
    paths, many = expand_images([f"{root}/*/*"])
    assert many and paths == sorted(root.glob("*/*.png")) and len(paths) == 4
    assert expand_images([f"{root}/**/*_001.png"])[0] == [root / "a" / "a_001.png", root / "b" / "b_001.png"]
    with pytest.raises(UsageError, match=r"no image matches .*\*\.txt$"):
        expand_images([f"{root}/*.txt"])
    with pytest.raises(UsageError, match=r"no image matches .*/a/\*\.txt \(1 other match\(es\), none an image"):
        expand_images([f"{root}/a/*.txt"])


def test_predict_and_eval_read_the_image_files_of_a_folder_by_one_rule(tmp_path):
    """zoo predict's folders and zoo eval's class folders are read by finetune.data.files.image_files (helper-90:
    each filtered walk_files by extension itself): files named as images in any case (.PNG, .Jpeg), sorted, at any
    depth; a text file, a file with no extension and a hidden image are not read."""
    from pathlib import Path

    from finetune.data.files import image_files

    root = make_image_folder(tmp_path / "d", classes=("a",), per_class=2, size=16)
    one = next(root.rglob("*.png"))
    for name in ("UPPER.PNG", "deep/mixed.Jpeg", "notes.txt", "README", ".hidden.png"):
        (root / "a" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "a" / name).write_bytes(one.read_bytes())
    expected = sorted(str(p) for p in (root / "a").rglob("*") if p.is_file() and not p.name.startswith(".")
                      and p.suffix.lower() in (".png", ".jpeg"))
    assert image_files(str(root / "a")) == expected and len(expected) == 4
    paths, _ = expand_images([root / "a"])
    assert paths == [Path(p) for p in expected]
    _, items, _ = find_eval_images(root, ["a"])
    assert [p for p, _ in items] == expected


def test_predict_and_eval_skip_what_the_training_scan_skips(tmp_path):
    """predict and eval walk folders as the training scan does (finetune.data.files.walk_files): hidden
    files, macOS resource forks and NAS thumbnails (Synology's @eaDir, __MACOSX) are neither predicted
    nor counted by zoo eval, and a symlinked folder is followed."""
    import shutil
    from pathlib import Path

    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    real = sorted(str(p) for p in root.rglob("*.png"))
    one = Path(real[0])
    for debris in (root / "a" / ".hidden.png", root / "a" / "._0.png", root / "a" / "@eaDir" / "0.png" / "thumb.png",
                   root / "b" / "__MACOSX" / "1.png", root / ".cache" / "x.png"):
        debris.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(one, debris)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(one, elsewhere / "x.png")
    (root / "a" / "linked").symlink_to(elsewhere, target_is_directory=True)    # followed, as the scan does
    real = sorted(real + [str(root / "a" / "linked" / "x.png")])
    paths, _ = expand_images([root])
    assert sorted(map(str, paths)) == real
    split, items, ignored = find_eval_images(root, ["a", "b"])
    assert split == "." and sorted(p for p, _ in items) == real and ignored == []



def test_eval_names_the_files_of_a_class_folder_that_are_no_image_type_as_the_scan_does(tmp_path):
    """QA (helper-109): a held-out folder of phone photos saved as HEIC (or a file without an extension) was scored
    on its JPEGs and PNGs alone without a word, where the training scan lists each such file in bad_files.txt
    with `not an image file type (.heic)` and warns. Eval now skips them with the scan's reason: a warning each, in
    metrics.json's skipped list and the summary's count ("unreadable or non-image", the scan's words)."""
    from zoo.cli.eval_cmd import skipped_lines

    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    (root / "a" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(20))
    make_image(root / "b" / "scan", 1, size=16, fmt="PNG")                         # no extension
    heard = []
    report = evaluate(MeanColour().eval(), ["a", "b", "c"], DC, root, on_error=lambda item, why: heard.append((item, why)))
    want = [(str(root / "a" / "IMG_0001.HEIC"), "not an image file type (.heic)"),
            (str(root / "b" / "scan"), "not an image file type (no extension)")]
    assert report.n_images == 4 and sorted(report.skipped) == want          # was [] (and the same 4 images)
    assert sorted((str(i), w) for i, w in heard) == want
    assert skipped_lines(report.skipped, []) == ["skipped 2 unreadable or non-image file(s)"]
    # the debris the scan ignores stays ignored without a word
    make_image(root / "a" / ".hidden.png", 0, size=16)
    (root / "a" / "Thumbs.db").write_bytes(b"x")
    assert sorted(evaluate(MeanColour().eval(), ["a", "b", "c"], DC, root).skipped) == want


def test_a_folder_that_cannot_be_listed_is_named_by_predict_and_eval_not_left_out_silently(tmp_path, monkeypatch):
    """QA session 22: a chmod 000 folder in a folder given to zoo predict or zoo eval was skipped without a word (its
    images neither predicted nor in eval's accuracy). It is now named with its reason: a warning line in predict,
    a skipped entry (and on_error) in eval. Root reads chmod 000 folders: os.scandir refuses as for a user."""
    import os

    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    make_image(root / "b" / "locked" / "x.png", 1, size=16)
    locked, real = str(root / "b" / "locked"), os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    unlisted = []
    paths, _ = expand_images([root], unlisted)
    reason = "folder cannot be read (Permission denied): the images in it are left out; make it readable to use them"
    assert len(paths) == 4 and unlisted == [(locked, reason)]
    heard = []
    report = evaluate(MeanColour().eval(), ["a", "b", "c"], DC, root, on_error=lambda item, why: heard.append(item))
    # (review: a folder is no "skipped ... unreadable image(s)": it was counted as one, its images uncounted)
    assert heard == [locked] and report.skipped == [] and report.unreadable_folders == [(locked, reason)]
    assert report.to_dict()["unreadable_folders"] == [{"path": locked, "reason": reason}]


def test_a_folder_that_cannot_be_listed_is_a_folder_in_the_warning_and_in_evals_summary(capsys):
    """Review of QA session 22: predict's and eval's warning for an unreadable folder said "image skipped", and
    eval's summary counted the folder as one "skipped ... unreadable image(s)"."""
    from zoo.cli.eval_cmd import skipped_lines
    from zoo.cli.predict import warn_skipped

    reason = "folder cannot be read (Permission denied): the images in it are left out; make it readable to use them"
    warn_skipped("d/b/locked", reason)
    assert capsys.readouterr().err == f"zoo: warning: folder skipped: d/b/locked: {reason}\n"
    lines = skipped_lines([("x.png", "not an image")], [("d/b/locked", reason), ("d/c", reason)])
    assert lines == ["skipped 1 unreadable image(s)",
                     "could not read 2 folder(s), e.g. d/b/locked: their images are not in the accuracy; make them "
                     "readable and evaluate again"]
    assert skipped_lines([], []) == []

def test_eval_of_class_folders_that_cannot_be_listed_says_so_not_that_they_hold_no_images(tmp_path, monkeypatch):
    """Review of QA session 22: when every class folder was unreadable, zoo eval stopped with "the class folders hold
    no images", before any warning was printed: it now says they cannot be read, and to make them readable."""
    import os

    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    locked, real = {str(root / "a"), str(root / "b")}, os.scandir

    def scandir(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UsageError, match=re.escape(f"--data {root}: 2 folder(s) in it cannot be read, e.g. {root / 'a'} "
                                                   "(folder cannot be read (Permission denied)), and no other holds "
                                                   "an image: make them readable to evaluate their images")):
        evaluate(MeanColour().eval(), ["a", "b"], DC, root)


def test_a_named_pipe_in_a_folder_is_skipped_with_its_reason_not_waited_on(tmp_path):
    """QA (session 18): zoo predict / zoo eval of a folder holding a FIFO named like an image hung for good."""
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=1, size=16)
    fifo_with_a_late_writer(root / "a" / "pipe.jpg")
    paths, _ = expand_images([root])
    skipped = []
    kept, probs = predict_probs(MeanColour().eval(), paths, DC,
                                on_error=lambda item, why: skipped.append((Path(item).name, why)))
    assert len(kept) == 2 and skipped == [("pipe.jpg", f"{root / 'a' / 'pipe.jpg'} is a named pipe, "
                                                      "not an image file; remove it from the folder")]


def test_an_empty_file_is_skipped_for_the_reason_the_scan_gives(tmp_path):
    """QA (helper-45): a zero-byte image was "empty file (0 bytes)" in the scan and bad_files.txt but "DataError:
    ... is not a readable image" in zoo predict and zoo eval (and in bad_files.txt when it emptied after the
    scan). One reason on every path, in the words the training loaders log (no exception class name)."""
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "junk.jpg").write_bytes(b"not an image")
    scanned = dict(scan_folder(root).bad_files)
    assert scanned == {str(root / "a" / "empty.jpg"): "empty file (0 bytes)",
                       str(root / "b" / "junk.jpg"): "not a readable image (unrecognised or damaged format)"}
    skipped = []
    paths, _ = expand_images([root])
    kept, _ = predict_probs(MeanColour().eval(), paths, DC, on_error=lambda item, why: skipped.append(why))
    assert len(kept) == 4 and skipped == [f"{root / 'a' / 'empty.jpg'} is an empty file (0 bytes); fix or remove it",
                                          f"{root / 'b' / 'junk.jpg'} is not a readable image; fix or remove it"]
    report = evaluate(MeanColour().eval(), ["a", "b", "c"], DC, root)
    assert [why for _, why in report.skipped] == skipped


def test_classification_metrics_by_hand():
    labels = ["a", "b", "c"]
    targets = np.array([0, 0, 1, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    m = classification_metrics(probs, targets, labels)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["top5"] is None                                  # only for C > 5
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    six_probs = np.array([[0.1, 0.5, 0.2, 0.1, 0.06, 0.04],     # target 2 ranked second: top-5 hit
                          [0.3, 0.2, 0.2, 0.15, 0.14, 0.01]])   # target 5 ranked last: miss
    six = classification_metrics(six_probs, np.array([2, 5]), list("abcdef"))
    assert six["accuracy"] == 0.0 and six["top5"] == pytest.approx(0.5)


def test_eval_and_the_run_page_compute_precision_and_recall_in_one_place():
    """zoo eval's per_class and the run page's table both come from finetune.core.confusion.precision_recall
    (helper-90: eval had its own numpy copy): precision, recall, F1 and support by hand, NaN (None in eval's
    per_class) for a class never predicted or with no images."""
    import math

    from finetune.core.confusion import precision_recall

    confusion = [[2, 1, 0], [0, 0, 0], [1, 0, 0]]      # b has no image; c is never predicted
    rows = precision_recall(["a", "b", "c"], confusion)
    assert rows[0] == ["a", 2 / 3, 2 / 3, 2 / 3, 3]
    assert rows[1][1] == 0.0 and math.isnan(rows[1][2]) and math.isnan(rows[1][3]) and rows[1][4] == 0
    assert math.isnan(rows[2][1]) and rows[2][2] == 0.0 and math.isnan(rows[2][3]) and rows[2][4] == 1
    probs = np.eye(3)[[0, 0, 1, 0]]                       # predicted a, a, b, a for true a, a, a, c
    m = classification_metrics(probs, np.array([0, 0, 0, 2]), ["a", "b", "c"])
    assert m["confusion"] == confusion
    assert m["per_class"] == {"a": {"precision": 2 / 3, "recall": 2 / 3, "support": 3},
                              "b": {"precision": 0.0, "recall": None, "support": 0},
                              "c": {"precision": None, "recall": 0.0, "support": 1}}


def test_a_class_folder_matches_its_label_in_either_unicode_form(tmp_path):
    """QA (session 18): a test folder copied from a Mac (cafe\\u0301, decomposed) was "not a class of the
    model" trained on caf\\xe9 (composed), the two printed alike."""
    make_image_folder(tmp_path / "d", classes=("a", "cafe\u0301"), per_class=1)
    split, items, ignored = find_eval_images(tmp_path / "d", ["a", "caf\u00e9"])
    assert ignored == [] and sorted(label for _, label in items) == [0, 1]


def test_find_eval_images_prefers_test_then_val(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2, layout="split",
                             val_per_class=1, size=16)
    split, items, ignored = find_eval_images(root, ["a", "b"])
    assert split == "val" and len(items) == 2 and ignored == []
    make_image_folder(root / "test", classes=("b", "zzz"), per_class=3, size=16)
    split, items, ignored = find_eval_images(root, ["a", "b"])
    assert split == "test" and {lab for _, lab in items} == {1} and ignored == ["zzz"]
    with pytest.raises(UsageError, match="no class folder matches"):
        find_eval_images(root / "test", ["x", "y"])
    # ImageNet-style folders named by synset match a pretrained model's descriptive labels
    split, items, ignored = find_eval_images(root / "test", ["tabby, tabby cat", "zebra"], aliases=["b", "zzz"])
    assert split == "." and sorted({lab for _, lab in items}) == [0, 1] and ignored == []


def test_an_empty_test_folder_beside_val_says_fill_it_or_score_val_not_found_none(tmp_path):
    """QA (helper-64): train/ and val/ with an empty test/ (made for later): zoo eval takes test/, as it should
    where there is one, and said `--data DIR/test: no class folder matches the model's labels (found: none;
    labels: ...); lay it out as <class>/<image>`, which the folder already is. Now it names the empty test/
    and the two ways on; an empty test/ alone (a hold-out set not filled yet) says the first."""
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2, layout="split",
                             val_per_class=1, size=16)
    (root / "test").mkdir()
    with pytest.raises(UsageError) as info:
        find_eval_images(root, ["a", "b"])
    assert str(info.value) == (f"--data {root}: {root / 'test'} holds no class folders, and zoo eval scores test/ "
                               f"where there is one: put the held-out images in {root / 'test'}/<class>/, or give "
                               f"--data {root / 'val'} to score the validation images")
    assert find_eval_images(root / "val", ["a", "b"])[0] == "."          # what it says works
    (tmp_path / "holdout" / "test").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"holdout/test holds no class folders, .*/test/<class>/$"):
        find_eval_images(tmp_path / "holdout", ["a", "b"])


def test_find_eval_images_reads_a_class_named_like_a_split_as_the_scan_does(tmp_path):
    """QA: a model trained on classes valid/ and invalid/ (the scan: a flat folder of two classes) could not be
    evaluated on that folder: eval took valid/ for the validation split and found no class folder in it."""
    root = make_image_folder(tmp_path / "data", classes=("invalid", "valid"), per_class=2, size=16)
    assert scan_folder(root).classes == ["invalid", "valid"]
    split, items, ignored = find_eval_images(root, ["invalid", "valid"])
    assert split == "." and sorted(lab for _, lab in items) == [0, 0, 1, 1] and ignored == []
    holdout = make_image_folder(tmp_path / "holdout" / "test", classes=("invalid", "valid"), per_class=1, size=16)
    assert find_eval_images(holdout.parent, ["invalid", "valid"])[0] == "test"    # a hold-out set alone


def test_evaluate_and_reports(tmp_path):
    root = tmp_path / "data"
    for name, colour in (("red", (250, 0, 0)), ("green", (0, 250, 0)), ("blue", (0, 0, 250))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 12), colour).save(root / name / f"{i}.png")
    Image.new("RGB", (12, 12), (0, 250, 0)).save(root / "blue" / "mislabelled.png")   # confidently wrong
    (root / "red" / "broken.png").write_bytes(b"\x89PNG broken")
    report = evaluate(MeanColour().eval(), ["red", "green", "blue"], DC, root, tta=True)
    assert report.split == "." and report.n_images == 7 and report.tta
    assert report.accuracy == pytest.approx(6 / 7)
    assert report.per_class["blue"]["recall"] == pytest.approx(2 / 3)
    assert report.per_class["green"]["precision"] == pytest.approx(2 / 3)
    assert report.wrong[0]["path"].endswith("mislabelled.png") and report.wrong[0]["predicted"] == "green"
    assert [p for p, _ in report.skipped] == [str(root / "red" / "broken.png")]

    paths = write_eval_reports(report, tmp_path / "out")
    assert json.loads(paths["metrics.json"].read_text())["accuracy"] == pytest.approx(6 / 7)
    rows = list(csv.reader(paths["confusion.csv"].open()))
    assert rows[0] == ["true \\ predicted", "red", "green", "blue"] and rows[3] == ["blue", "0", "1", "2"]
    assert paths["confusion.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wrong = list(csv.DictReader(paths["wrong.csv"].open()))
    assert wrong[0]["true"] == "blue" and float(wrong[0]["confidence"]) > 0.5
    per_class = list(csv.DictReader(paths["per_class.csv"].open()))
    assert [r["class"] for r in per_class] == ["red", "green", "blue"]


class LeftRight(torch.nn.Module):
    """Not flip-invariant: class 0's logit is 3 x the red of the left half, class 1's the red of the right half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.stack([3 * x[:, 0, :, :half].mean(dim=(1, 2)), x[:, 0, :, half:].mean(dim=(1, 2))], dim=1)


def _half_red(side: str, w: int = 10) -> Image.Image:
    a = np.zeros((w, w, 3), dtype=np.uint8)
    a[:, (slice(0, w // 2) if side == "left" else slice(w // 2, w)), 0] = 255
    return Image.fromarray(a)


def test_flip_views_are_the_validation_view_and_its_mirror():
    from zoo.predict import eval_transform

    img = _gradient(12, 10)
    views = tta_transform(DC, views="flip")(img)
    assert views.shape == (2, 3, 8, 8)
    assert torch.equal(views[0], eval_transform(DC)(img)) and torch.equal(views[1], views[0].flip(-1))
    with pytest.raises(UsageError, match="--tta-views ten"):
        tta_transform(DC, scales=[8], views="flip")
    with pytest.raises(UsageError, match="choose one of flip, ten"):
        tta_transform(DC, views="five")


def test_flip_tta_averages_the_mirror_view():
    from zoo.predict import eval_transform

    model = LeftRight().eval()
    img = _gradient(12, 10)
    _, single = predict_probs(model, [img], DC)
    _, tta = predict_probs(model, [img], DC, tta=True, tta_views="flip")
    x = eval_transform(DC)(img)[None]
    with torch.no_grad():
        want = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    assert torch.allclose(tta, want, atol=1e-6) and not torch.allclose(tta, single, atol=1e-3)
    # a mirror-symmetric image: its mirror view is itself, so the average is the single view's
    sym = np.zeros((10, 10, 3), dtype=np.uint8)
    sym[:, 2:8, 0] = 200
    sym[3:7, :, 0] = 90
    _, single = predict_probs(model, [Image.fromarray(sym)], DC)
    _, tta = predict_probs(model, [Image.fromarray(sym)], DC, tta=True, tta_views="flip")
    assert torch.allclose(tta, single, atol=1e-6)


def _left_right_folder(root):
    """left/ and right/, two half-red images each (the LeftRight model gets every one right)."""
    for name in ("left", "right"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            _half_red(name).save(root / name / f"{i}.png")
    return root


def test_eval_tta_accuracy_comes_from_the_averaged_probabilities(tmp_path):
    # Single view: each image is right. Its mirror votes strongly for the other class; averaged, the "right"
    # images tip over to "left": TTA accuracy 1/2, as the averaged probabilities say.
    root = _left_right_folder(tmp_path / "data")
    model = LeftRight().eval()
    plain = evaluate(model, ["left", "right"], DC, root)
    tta = evaluate(model, ["left", "right"], DC, root, tta=True, tta_views="flip")
    assert plain.accuracy == 1.0 and not plain.tta and plain.tta_views is None
    assert tta.accuracy == 0.5 and tta.tta_views == "flip" and tta.to_dict()["tta_views"] == "flip"
    assert tta.per_class["right"]["recall"] == 0.0 and tta.per_class["left"]["recall"] == 1.0
    _, probs = predict_probs(model, [root / "right" / "0.png"], DC, tta=True, tta_views="flip")
    assert probs[0, 0] > 0.5


def test_cli_tta_choices_are_the_library_ones():
    from zoo.cli import predict as cli_predict
    from zoo.predict import DEFAULT_TTA_VIEWS, TTA_VIEWS

    assert cli_predict.TTA_VIEWS == TTA_VIEWS and cli_predict.DEFAULT_TTA_VIEWS == DEFAULT_TTA_VIEWS


def test_a_pil_image_is_converted_as_its_file_would_be(tmp_path):
    """QA: bundle.predict(PIL image) used Image.convert("RGB"): a 16-bit image clipped to white, transparency
    turned black, so the same picture got another answer as a PIL image than as a path."""
    import numpy as np
    from PIL import Image

    from zoo.predict import _load

    g16 = Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16))
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    for name, img in (("g16.png", g16), ("clear.png", clear)):
        img.save(tmp_path / name)
        assert _load(Image.open(tmp_path / name), None).tobytes() == _load(tmp_path / name, None).tobytes(), name



@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_pil_image_of_a_rotated_photo_is_turned_upright_as_its_file_is(tmp_path, orientation):
    """QA (helper-109): bundle.predict(Image.open("photo.jpg")) of a phone photo stored sideways (EXIF orientation
    6) classified it sideways, while `zoo predict`, `zoo serve` and training turn it upright: one photo, two
    answers. A PIL image is turned by its EXIF as its file is (as diffusers' and transformers' load_image do); one
    already turned (``ImageOps.exif_transpose``) carries no orientation any more and stays as it is."""
    from PIL import Image, ImageOps

    from zoo.predict import _load

    stored = Image.new("RGB", (40, 24), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 6))                       # a red corner marks the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "photo.jpg", quality=95, exif=exif)
    as_file = _load(tmp_path / "photo.jpg", None)
    assert as_file.size == ((24, 40) if orientation in (6, 8) else (40, 24))
    for given in (Image.open(tmp_path / "photo.jpg"), Image.open(tmp_path / "photo.jpg").convert("RGB"),
                  ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg"))):
        assert _load(given, None).tobytes() == as_file.tobytes()   # was the stored (sideways) pixels

def test_a_big_jpeg_opened_with_pil_gets_the_pixels_and_probabilities_of_its_path(tmp_path):
    """Session 30's leftover (helper-115): bundle.predict(Image.open("big.jpg")) decoded the JPEG at full size where
    bundle.predict("big.jpg") decodes it at a reduced scale (PIL draft, as training and eval): one photo, 0.727 vs
    0.747. An image as Image.open returns it now decodes as its file (decode_opened), and is left unchanged itself;
    one loaded or drafted before it is given is used as given."""
    from PIL import ImageOps

    from zoo.predict import _load, eval_transform

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    path = tmp_path / "big.jpg"
    min_size = eval_transform(DC).min_size                            # 10: the draft reaches 1/8 scale
    as_file = _load(path, min_size)
    assert as_file.size == (50, 38)
    given = Image.open(path)
    assert _load(given, min_size).tobytes() == as_file.tobytes()     # was the 400x300 decode
    assert given.size == (400, 300) and given.load() is not None     # the caller's image: as it was, readable
    model = MeanColour().eval()
    assert torch.equal(predict_probs(model, [Image.open(path)], DC)[1], predict_probs(model, [path], DC)[1])
    assert torch.equal(predict_probs(model, [Image.open(path)] * 3, DC, threads=2)[1],
                       predict_probs(model, [path] * 3, DC, threads=2)[1])
    assert _load(given, min_size).size == (400, 300)                  # loaded before: as given
    drafted = Image.open(path)
    drafted.draft("RGB", (200, 150))
    assert _load(drafted, min_size).size == (200, 150)                # the caller's own draft: as given
    assert _load(ImageOps.mirror(Image.open(path)), min_size).size == (400, 300)


def test_eval_on_a_folder_with_train_only_says_where_held_out_images_go(tmp_path):
    """QA: `zoo eval BUNDLE --data photos` on photos/train/<class>/ (no test/ or val/) answered "no class folder
    matches the model's labels (found: train ...); lay it out as <class>/<image>", which misleads."""
    root = make_image_folder(tmp_path / "data" / "train", classes=("a", "b"), per_class=1, size=16).parent
    with pytest.raises(UsageError, match=r"has train/ but no test/ or val/ to evaluate on; put held-out images in "
                                         r".*test/<class>/, or give --data .*train to score the training images"):
        find_eval_images(root, ["a", "b"])
    assert len(find_eval_images(root / "train", ["a", "b"])[1]) == 2


@pytest.mark.parametrize("fmt,piped", [("JPEG", False), ("PNG", True)])
def test_dash_reads_one_image_from_stdin(tmp_path, fmt, piped):
    """QA: `zoo predict BUNDLE - < cat.jpg` (or `curl ... | zoo predict BUNDLE -`) was "no such image or folder: -".
    Review (session 24): a PNG through a pipe was "not a readable image" once PNG checksums were verified before
    decoding (a second read of a stream whose bytes the first had spent)."""
    import subprocess
    import sys

    from tests.zoo.test_bundle import make_run
    from zoo.bundle import export_run

    bundle = export_run(make_run(tmp_path)[0], tmp_path / "bundle")
    image = make_image(tmp_path / f"cat.{fmt.lower()}", 0, fmt=fmt)
    cmd = [sys.executable, "-m", "zoo", "predict", str(bundle), "-", "--topk", "1", "--json"]
    if piped:
        res = subprocess.run(cmd, input=image.read_bytes(), capture_output=True, timeout=600, cwd=ROOT)
        res.stdout, res.stderr = res.stdout.decode(), res.stderr.decode()
    else:
        with open(image, "rb") as stdin:
            res = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [d["image"] for d in doc] == ["/dev/stdin"] and len(doc[0]["predictions"]) == 1


def test_without_mirror_tta_keeps_only_the_unmirrored_views():
    from zoo.predict import eval_transform

    img = _gradient(20, 30)
    one = tta_transform(DC, views="flip", mirror=False)(img)
    assert one.shape == (1, 3, 8, 8) and torch.equal(one[0], eval_transform(DC)(img))
    ten, five = tta_transform(DC, [8, 12])(img), tta_transform(DC, [8, 12], mirror=False)(img)
    assert five.shape == (10, 3, 8, 8)          # five crops at each of 2 scales
    assert torch.equal(five[:5], ten[:5]) and torch.equal(five[5:], ten[10:15])   # ten_crop: the five, then mirrors


def test_a_model_trained_without_mirrors_keeps_its_tta_accuracy(tmp_path):
    # The left/right model of the test above: with the mirrored view left out, TTA (flip) is the plain view.
    root = _left_right_folder(tmp_path / "data")
    model = LeftRight().eval()
    report = evaluate(model, ["left", "right"], DC, root, tta=True, tta_views="flip", mirror=False)
    assert report.accuracy == 1.0 and report.to_dict()["tta_mirror"] is False
    assert evaluate(model, ["left", "right"], DC, root, tta=True).to_dict()["tta_mirror"] is True
    assert evaluate(model, ["left", "right"], DC, root).to_dict()["tta_mirror"] is None
    _, plain = predict_probs(model, [root / "right" / "0.png"], DC)
    _, tta = predict_probs(model, [root / "right" / "0.png"], DC, tta=True, mirror=False)
    assert torch.equal(tta, plain)


def test_confusion_png_with_a_very_long_class_name_prints_nothing(tmp_path):
    """QA: a 200-character class name made `zoo eval` print matplotlib's '.../zoo/evaluate.py:264: UserWarning:
    Tight layout not applied...' and its code line, and the name ran off the figure; it is cut at 40 characters."""
    import warnings

    from zoo.evaluate import _confusion_png

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _confusion_png([[2, 0], [1, 1]], ["L" * 200, "short"], tmp_path / "confusion.png")
    assert [str(w.message) for w in caught] == [] and (tmp_path / "confusion.png").stat().st_size > 0


def test_confusion_png_draws_class_names_with_dollar_signs_as_written(tmp_path):
    """Dataset-shapes audit (helper-120): class folders named `$5 to $10` or `$\\frac$` (two `$`: matplotlib's
    math text) ended `zoo eval` with a traceback (ParseSyntaxException) after its csv files, no confusion.png
    nor wrong.csv written, or drew `$5 to $10` as math. Tick labels are drawn as the text they are."""
    import warnings

    from zoo.evaluate import _confusion_png

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _confusion_png([[2, 0, 0], [1, 1, 0], [0, 0, 1]], ["$5 to $10", "$\\frac$", "x^$y$_{"], tmp_path / "c.png")
    assert [str(w.message) for w in caught] == [] and (tmp_path / "c.png").stat().st_size > 0


def test_a_quoted_pattern_takes_folders_and_skips_debris_as_the_shell_and_a_folder_walk_do(tmp_path):
    """Review: `zoo predict B 'photos/*'` (folders matched) said 'no image matches', though the shell's own
    expansion (unquoted) hands zoo the folders, which it walks; and `'photos/**/*.jpg'` predicted Synology's
    @eaDir thumbnails, which `zoo predict B photos` (walk_files, as the training scan) skips."""
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    thumbs = root / "a" / "@eaDir" / "a_000.png"
    thumbs.mkdir(parents=True)
    make_image(thumbs / "SYNOPHOTO_THUMB_M.png", 0)
    walked = expand_images([root])[0]
    assert thumbs / "SYNOPHOTO_THUMB_M.png" not in walked and len(walked) == 4
    assert expand_images([f"{root}/*"])[0] == walked
    assert expand_images([f"{root}/**/*.png"])[0] == walked
    assert expand_images([f"{root}/**"])[0] == walked          # each image once, though ** matches its folders too


def _png_with_a_wrong_idat_crc(path: Path, colour: tuple[int, int, int]) -> None:
    """A valid PNG with one byte of its IDAT chunk's CRC flipped: the pixel data itself inflates whole."""
    import io
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT")
    data[at + 4 + struct.unpack(">I", data[at - 4:at])[0]] ^= 0xFF      # first byte of the chunk's CRC
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


def test_a_png_with_a_wrong_crc_is_damaged_to_every_reader_as_to_the_scan(tmp_path):
    """QA (helper-72, left): a PNG whose IDAT CRC is wrong (pixels whole) was skipped by the training scan and
    zoo doctor (Pillow's verify checks CRCs) but predicted by zoo predict, eval and serve (Pillow's decode does
    not): eval counted one image more than training on the same folder. Every reader now calls it damaged, as
    libpng and browsers do; the training loaders, reading files the scan checked, do not check it each epoch."""
    from finetune.core.errors import DataError
    from finetune.data import load_image
    from zoo.serve import ImageRejected, ServeConfig, decode_upload

    for name, colour in zip("abc", [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (tmp_path / name).mkdir()
        for j in range(2):
            Image.new("RGB", (12, 12), colour).save(tmp_path / name / f"{j}.png")
    bad = tmp_path / "a" / "bad_crc.png"
    _png_with_a_wrong_idat_crc(bad, (255, 0, 0))

    scan = scan_folder(tmp_path, val_split=0.5)
    assert [(Path(p).name, "bad header checksum" in why) for p, why in scan.bad_files] == [("bad_crc.png", True)]
    report = evaluate(MeanColour().eval(), ["a", "b", "c"], DC, tmp_path)
    assert report.n_images == 6 == len(scan.train.items) + len(scan.val.items)       # 7 before: bad_crc.png too
    assert [(Path(p).name, "bad header checksum" in why) for p, why in report.skipped] == [("bad_crc.png", True)]
    with pytest.raises(DataError, match=r"bad_crc\.png .*bad header checksum.*fix or remove the file"):
        load_image(bad)                                                   # zoo predict's decode
    with pytest.raises(ImageRejected, match="bad header checksum"):
        decode_upload(bad.read_bytes(), "image/png", "bad_crc.png", ServeConfig())
    assert load_image(bad, checked=True).size == (12, 12)   # the loaders' read: the scan's check stands
    assert decode_upload((tmp_path / "a" / "0.png").read_bytes(), "image/png", "0.png", ServeConfig())[1] == (12, 12)


def test_confusion_png_of_many_classes_shows_the_most_confused_ones_by_name(tmp_path, monkeypatch):
    """Many-classes audit (helper-128): above 40 classes confusion.png drew the whole matrix without names, at
    1,000 classes a 2400-px diagonal line (1.2 MB) whose mistakes, cells of 1-2 images, were single pale pixels.
    It now draws the classes of the most-confused pairs (fastai's ``most_confused``), named, in class order."""
    from matplotlib.figure import Figure

    import zoo.evaluate as evaluate

    figures = []

    class Kept(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(evaluate, "Figure", Kept)
    n = 200
    matrix = [[1 if i == j else 0 for j in range(n)] for i in range(n)]
    for true, predicted, images in ((5, 17, 3), (17, 5, 1), (100, 150, 2), (199, 0, 1)):
        matrix[true][predicted] = images
    evaluate._confusion_png(matrix, [f"c{i:03d}" for i in range(n)], tmp_path / "confusion.png")
    ax = figures[0].axes[0]
    shown = [0, 5, 17, 100, 150, 199]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"c{i:03d}" for i in shown]
    assert ax.get_images()[0].get_array().tolist() == [[matrix[i][j] for j in shown] for i in shown]
    assert "6 of 200 classes" in ax.get_title() and (tmp_path / "confusion.png").stat().st_size > 0


def test_a_png_with_a_wrong_crc_opened_with_pil_is_damaged_as_its_file_is(tmp_path):
    """Session 35's leftover (helper-147): bundle.predict(Image.open("bad_crc.png")) predicted a PNG whose IDAT CRC
    is wrong, where bundle.predict("bad_crc.png") and zoo predict refuse it (the path's check, ``verified``, was
    not asked of the second opening that decodes an unloaded PIL image as its file). An image as Image.open returns
    it, from a path or a file object, now goes through the path's check; a good one is predicted as before."""
    import io

    from zoo.predict import _load

    bad, good = tmp_path / "bad_crc.png", tmp_path / "good.png"
    _png_with_a_wrong_idat_crc(bad, (255, 0, 0))
    Image.new("RGB", (12, 12), (255, 0, 0)).save(good)
    model, reasons = MeanColour().eval(), []
    for given in (Image.open(bad), Image.open(io.BytesIO(bad.read_bytes())), Image.open(bad.open("rb"))):
        assert predict_probs(model, [given, good], DC, on_error=lambda item, why: reasons.append(why))[0] == [1]
        assert given.size == (12, 12) and given.fp is not None        # the caller's image and file: as they were
    assert [("bad header checksum" in why) for why in reasons] == [True] * 3
    with pytest.raises(SyntaxError, match="bad header checksum"):
        _load(Image.open(bad), None)
    caller = Image.open(good)
    assert _load(caller, None).tobytes() == _load(good, None).tobytes() == caller.convert("RGB").tobytes()
    loaded = Image.open(bad)
    loaded.load()           # decoded by the caller: Pillow keeps no file (fp None) to check, used as given
    assert loaded.fp is None and _load(loaded, None).size == (12, 12)
    assert torch.equal(predict_probs(model, [Image.open(good)], DC)[1], predict_probs(model, [good], DC)[1])
