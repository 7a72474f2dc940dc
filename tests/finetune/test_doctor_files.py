"""finetune.tools.doctor.checks.file_facts on threads: the serial pass's results, in order, to the bit."""
from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune.core.threads as threads
import finetune.tools.doctor.checks as checks
from finetune.tools.doctor.checks import file_facts, file_threads
from tests.conftest import corrupt_jpeg, make_image


def _folder(root: Path) -> list[str]:
    """Good PNGs and JPEGs (one EXIF-turned, two copies of one), a corrupt JPEG, an empty file, a text file named
    .jpg, a missing path and an image between 1x and 2x PIL's pixel limit, spread over several runs of files."""
    paths = []
    for i in range(40):
        fmt = "JPEG" if i % 3 == 0 else "PNG"
        paths.append(str(make_image(root / f"img{i:02d}.{fmt.lower()}", i % 4, size=24 + i % 9, fmt=fmt)))
    good = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good, "JPEG")
    (root / "corrupt.jpg").write_bytes(corrupt_jpeg(good.getvalue()))
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (root / "copy.png").write_bytes(Path(paths[1]).read_bytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = Image.new("RGB", (20, 40), (20, 90, 200))
    turned.paste((250, 250, 0), (0, 0, 10, 20))
    turned.save(root / "turned.jpg", exif=exif.tobytes())
    Image.new("RGB", (40, 40), (10, 200, 10)).save(root / "big.png")      # 1,600 px: over 1x the limit set below
    extra = ["corrupt.jpg", "empty.png", "text.jpg", "missing.png", "copy.png", "turned.jpg", "big.png"]
    for k, name in enumerate(extra):
        paths.insert(5 + 6 * k, str(root / name))
    return paths


def _same(a, b) -> None:
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].tobytes() == b[2].tobytes() and a[3].tolist() == b[3].tolist()


def test_the_file_pass_on_threads_is_the_serial_pass_in_order_to_the_bit(tmp_path, monkeypatch):
    """The doctor's file pass (sha256, header size, pixel fingerprint) ran on one thread: one core's rate on a
    16-core GPU box. On threads, in runs of files, it gives the serial pass's results in input order, bit for bit,
    for good, damaged, empty, missing and over-the-limit files alike, and reports progress per file from the
    calling thread."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)      # big.png: over 1x, under 2x (2,400 px: over 2x)
    paths = _folder(tmp_path)
    serial = file_facts(paths, threads=0)
    callers: list[int] = []
    threaded = file_facts(paths, lambda k: callers.extend([threading.get_ident()] * k), threads=3)
    _same(threaded, serial)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))      # a GPU box: threads by default
    assert file_threads(paths) == checks.FILE_THREADS
    _same(file_facts(paths), serial)
    assert callers == [threading.get_ident()] * len(paths)
    hashes, sizes, _, has = threaded
    name = {Path(p).name: k for k, p in enumerate(paths)}
    for p, h in zip(paths, hashes):       # order kept: each row is its own file's
        assert h == (hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.exists(p) else "")
    assert sizes[name["turned.jpg"]] == (40, 20) and sizes[name["img07.png"]] == (31, 31)
    assert sizes[name["big.png"]] == (40, 40) and not has[name["big.png"]]     # its size, as before; no decode
    for bad in ("corrupt.jpg", "empty.png", "text.jpg", "missing.png"):
        assert not has[name[bad]], bad
    assert sizes[name["corrupt.jpg"]] == (40, 30)          # the header reads, the pixels do not
    assert [sizes[name[b]] for b in ("empty.png", "text.jpg", "missing.png")] == [None] * 3
    assert has.sum() == 40 + 2 and hashes[name["copy.png"]] == hashes[1]
    assert np.array_equal(threaded[2][name["copy.png"]], threaded[2][1])


def test_file_threads_read_under_the_pil_filters_and_leave_the_process_filters_as_they_were(tmp_path, monkeypatch):
    """pil_warnings (catch_warnings) is not thread-safe: entered on each thread, one thread restores the filters
    another had set, which can outlive the pass or leave a read without them (zoo.predict's review, helper-85).
    Entered once around the threads, each thread finds PIL's filters set before it reads a file, and the
    process's own filters come back."""
    paths = [str(make_image(tmp_path / f"{i:03d}.png", i % 3, size=20)) for i in range(96)]
    before = list(warnings.filters)
    found: list[bool] = []
    real = checks._facts_of

    def facts_of(path):
        found.append(any(f[0] == "error" and f[2] is Image.DecompressionBombWarning for f in warnings.filters))
        return real(path)

    monkeypatch.setattr(checks, "_facts_of", facts_of)
    for _ in range(3):
        assert file_facts(paths, threads=4)[3].all()
        assert warnings.filters == before
    assert found == [True] * 3 * len(paths)


def test_a_ctrl_c_stops_the_file_threads_without_reading_the_rest(tmp_path, monkeypatch):
    """A Ctrl-C (here from the progress callback) drops the runs of files not started and waits only for those
    being read: a pool left to finish, or joined at exit, read every file first. No thread outlives the pass."""
    paths = [str(make_image(tmp_path / f"{i:03d}.png", 0, size=16)) for i in range(20 * checks._FACTS_RUN)]
    gate, read = threading.Event(), []
    real = checks._facts_of

    def facts_of(path):      # every run but the first waits until the pool has been told to stop
        if paths.index(path) >= checks._FACTS_RUN:
            assert gate.wait(30)
        read.append(path)
        return real(path)

    class Pool(threads.ThreadPoolExecutor):
        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=False, cancel_futures=cancel_futures)
            gate.set()
            super().shutdown(wait=wait)

    def interrupt(_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checks, "_facts_of", facts_of)
    monkeypatch.setattr(threads, "ThreadPoolExecutor", Pool)
    before = list(warnings.filters)
    with pytest.raises(KeyboardInterrupt):
        file_facts(paths, interrupt, threads=2)
    assert len(read) <= 3 * checks._FACTS_RUN        # the first run, and the two runs being read when it stopped
    assert not [t for t in threading.enumerate() if t.name.startswith("zoo-doctor-files")]
    assert warnings.filters == before


def test_a_named_pipe_among_the_files_is_not_opened(tmp_path):
    """A pipe put among the images after the scan (which skips it) was opened by the file pass's hash, which waits
    for a writer: a thread left in it would outlive a Ctrl-C and the process. It is refused as load_image refuses
    it: no hash, no size. A stream named on purpose (/dev/stdin) keeps the pass on the calling thread."""
    paths = [str(make_image(tmp_path / f"{i:03d}.png", 1, size=16)) for i in range(40)]
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    paths.insert(17, str(pipe))
    out: list = []
    worker = threading.Thread(target=lambda: out.append(file_facts(paths, threads=2)), daemon=True)
    try:
        worker.start()
        worker.join(20)
        assert out, "the file pass waited on the pipe"
    finally:
        for _ in range(50):                  # a reader left in the pipe (a regression) is let go
            if not worker.is_alive():
                break
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            worker.join(0.1)
    hashes, sizes, _, has = out[0]
    assert (hashes[17], sizes[17], bool(has[17])) == ("", None, False)
    assert all(hashes[:17] + hashes[18:]) and has.sum() == 40


def test_the_file_pass_runs_on_threads_only_where_they_pay(monkeypatch):
    """Threads where the machine has more than FEW_CPUS cores (a GPU box: one core's rate was the pass's limit);
    none on the 2 cores here, where they gave no gain that held (docs/benchmarks.md), for a few files, or where a
    stream named on purpose is among them (zoo.predict's rule: a Ctrl-C would wait for the stream's writer)."""
    paths = [f"/data/cat/{i}.jpg" for i in range(2 * checks._FACTS_RUN)]
    for cpus, threads in ((16, checks.FILE_THREADS), (6, 6), (checks.FEW_CPUS, 0), (2, 0)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert file_threads(paths) == threads, cpus
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    assert file_threads(paths[1:]) == 0
    assert file_threads(paths[:16] + ["/dev/stdin"] + paths[16:]) == 0
    assert file_threads(paths[:16] + ["/dev/shm/data/cat/x.jpg"] + paths[16:]) == checks.FILE_THREADS


def test_a_bomb_over_twice_the_limit_and_an_error_in_a_thread_are_as_on_one_thread(tmp_path, monkeypatch):
    """Review (helper-88): an image over twice PIL's limit (DecompressionBombError, not the warning the pass reads
    the size of later) has no size and no fingerprint on threads as on one, as before the threads; an error raised
    in a thread (MemoryError, a bug) is raised to the caller, not waited on, and leaves no thread and no filter."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    paths = [str(make_image(tmp_path / f"{i:03d}.png", i % 3, size=20)) for i in range(40)]
    Image.new("RGB", (60, 60), (10, 200, 10)).save(tmp_path / "huge.png")       # 3,600 px: over 2x
    paths.insert(21, str(tmp_path / "huge.png"))
    serial = file_facts(paths, threads=0)
    _same(file_facts(paths, threads=3), serial)
    assert (serial[1][21], bool(serial[3][21])) == (None, False) and serial[0][21]
    before, real = list(warnings.filters), checks._facts_of

    def facts_of(path):
        if path == paths[30]:
            raise MemoryError("a worker ran out")
        return real(path)

    monkeypatch.setattr(checks, "_facts_of", facts_of)
    with pytest.raises(MemoryError, match="a worker ran out"):
        file_facts(paths, threads=3)
    assert not [t for t in threading.enumerate() if t.name.startswith("zoo-doctor-files")]
    assert warnings.filters == before
