"""zoo serve: the JSON API over a real uvicorn server on 127.0.0.1 (httpx client), 20 hostile uploads, the
batcher, the CLI's one-line errors. The page in headless Chromium: scripts/screenshot_serve.py (slow test
below); the load test: scripts/bench_serve.py -> docs/benchmarks.md."""
from __future__ import annotations

import asyncio
import base64
import io
import shutil
import socket
import struct
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.conftest import corrupt_jpeg, make_image  # noqa: E402
from tests.zoo.test_bundle import CLASSES, make_run  # noqa: E402
from zoo.bundle import export_run, load_bundle  # noqa: E402
from zoo.cli import cli  # noqa: E402
from zoo.serve import Batcher, ServeConfig, create_app, start_background  # noqa: E402


# the repository root: subprocesses import this checkout's zoo, whichever folder pytest runs from
ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run, _ = make_run(root)
    return export_run(run, root / "bundle")


@pytest.fixture(scope="module")
def server(bundle_dir):
    bundle = load_bundle(bundle_dir)
    bg = start_background(create_app(bundle, ServeConfig(topk=3, max_upload_bytes=1024 * 1024, max_files=4)))
    bg.extra["bundle"] = bundle
    yield bg
    bg.stop()


def png_bytes(cls: int = 0, size=(40, 36), fmt="PNG") -> bytes:
    from PIL import ImageDraw

    img = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(img).ellipse([4, 4, size[0] - 4, size[1] - 4], fill=[(220, 40, 40), (40, 200, 40)][cls % 2])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_predict_files_and_file(server, tmp_path):
    a, b = png_bytes(0), png_bytes(1)
    r = httpx.post(f"{server.url}/predict", files=[("files", ("a.png", a, "image/png")),
                                                  ("files", ("b.png", b, "image/png"))])
    assert r.status_code == 200, r.text
    doc = r.json()
    # `image`, as zoo predict --json names it (QA: serve said `filename`); `filename` stays, a documented alias
    assert [x["image"] for x in doc["results"]] == [x["filename"] for x in doc["results"]] == ["a.png", "b.png"]
    bundle = server.extra["bundle"]
    for item, data in zip(doc["results"], (a, b)):
        want = bundle.predict(Image.open(io.BytesIO(data)), topk=3)[0]
        assert [p["label"] for p in item["predictions"]] == [lab for lab, _ in want]
        assert all(abs(p["prob"] - q) < 1e-4 for p, (_, q) in zip(item["predictions"], want))
        assert (item["width"], item["height"]) == (40, 36) and "crop" not in item
    r = httpx.post(f"{server.url}/predict?topk=1&crop=true", files={"file": ("a.jpg", png_bytes(0, fmt="JPEG"),
                                                                              "image/jpeg")})
    assert r.status_code == 200, r.text
    (item,) = r.json()["results"]
    assert len(item["predictions"]) == 1 and item["predictions"][0]["label"] in CLASSES
    crop = Image.open(io.BytesIO(base64.b64decode(item["crop"].split(",", 1)[1])))
    _, h, w = server.extra["bundle"].data_config["input_size"]
    assert crop.size == (w, h)          # the bundle's input size: what the model saw


def test_info_openapi_docs_and_page(server):
    info = httpx.get(f"{server.url}/info").json()
    assert info["labels"] == list(CLASSES) and info["data_config"]["input_size"] == [3, 64, 64]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    assert "`filename`, the same name, is kept for older clients" in spec["info"]["description"]   # the alias
    assert httpx.get(f"{server.url}/docs").status_code == 200
    page = httpx.get(f"{server.url}/").text
    assert "Drop images here" in page and "/predict?crop=true" in page
    assert "res.image" in page and "filename" not in page         # the page reads the key of zoo predict --json


def _png_with_size(w: int, h: int) -> bytes:
    data = bytearray(png_bytes())
    ihdr = data[12:29]                               # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", w, h)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _jpeg_with_size(w: int, h: int) -> bytes:
    data = bytearray(png_bytes(fmt="JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _gif_with_size(w: int, h: int) -> bytes:
    data = bytearray(png_bytes(fmt="GIF"))
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def _bmp_with_size(w: int, h: int) -> bytes:
    data = bytearray(png_bytes(fmt="BMP"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")     # 64 M pixels in a few kB
    return buf.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>'


def hostile_cases():
    good_jpeg = png_bytes(fmt="JPEG")
    good_png = png_bytes()
    one = lambda name, data, ctype: {"files": [("files", (name, data, ctype))]}  # noqa: E731
    return [
        ("empty file", one("e.jpg", b"", "image/jpeg"), 400),
        ("truncated JPEG", one("t.jpg", good_jpeg[: len(good_jpeg) // 2], "image/jpeg"), 400),
        ("corrupt JPEG data", one("c.jpg", corrupt_jpeg(good_jpeg), "image/jpeg"), 400),
        ("truncated PNG", one("t.png", good_png[: len(good_png) // 2], "image/png"), 400),
        ("PNG signature only", one("s.png", good_png[:8], "image/png"), 415),
        ("SVG", one("x.svg", SVG, "image/svg+xml"), 415),
        ("SVG declared PNG", one("x.png", SVG, "image/png"), 415),
        ("text declared JPEG", one("x.jpg", b"hello, not an image", "image/jpeg"), 415),
        ("PNG sent as text/plain", one("x.txt", good_png, "text/plain"), 415),
        ("PNG sent as application/json", one("x.json", good_png, "application/json"), 415),
        ("HTML", one("x.html", b"<html><script>1</script></html>", "text/html"), 415),
        ("PDF", one("x.pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "application/pdf"), 415),
        ("random bytes", one("x.bin", bytes(range(256)) * 8, "application/octet-stream"), 415),
        ("PNG 100000x100000 header", one("big.png", _png_with_size(100_000, 100_000), "image/png"), 413),
        ("JPEG 60000x60000 header", one("big.jpg", _jpeg_with_size(60_000, 60_000), "image/jpeg"), 413),
        ("GIF 65535x65535 header", one("big.gif", _gif_with_size(65_535, 65_535), "image/gif"), 413),
        ("BMP 50000x50000 header", one("big.bmp", _bmp_with_size(50_000, 50_000), "image/bmp"), 413),
        ("decompression bomb (64 Mpx PNG)", one("bomb.png", _bomb(), "image/png"), 413),
        ("upload over the size limit", one("huge.png", b"\x89PNG" + bytes(1_200_000), "image/png"), 413),
        ("too many files", {"files": [("files", (f"{i}.png", good_png, "image/png")) for i in range(5)]}, 413),
        ("no file field", {"data": {"x": "1"}}, 400),
        ("JSON body instead of a form", {"json": {"files": ["a.png"]}}, 400),
    ]


@pytest.mark.parametrize("case", range(len(hostile_cases())))
def test_hostile_upload_gets_4xx_and_server_keeps_serving(server, case):
    name, kwargs, status = hostile_cases()[case]
    r = httpx.post(f"{server.url}/predict", **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    ok = httpx.post(f"{server.url}/predict", files={"file": ("ok.png", png_bytes(), "image/png")})
    assert ok.status_code == 200 and httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_hostile_list_has_twenty_distinct_cases():
    cases = hostile_cases()
    assert len(cases) >= 20 and len({c[0] for c in cases}) == len(cases)


def test_batcher_gathers_concurrent_requests():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()

    async def go(max_batch: int) -> tuple[list[int], torch.Tensor]:
        b = Batcher(model, max_batch=max_batch, wait_ms=0)
        await b.start()
        xs = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
        rows = await asyncio.gather(*(b.submit(x) for x in xs))    # all queued before the worker wakes
        await b.stop()
        return b.sizes, torch.stack(rows)

    sizes, rows = asyncio.run(go(16))
    assert sizes == [8]
    sizes3, rows3 = asyncio.run(go(3))
    assert sizes3 == [3, 3, 2]
    with torch.no_grad():
        want = model(torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))).softmax(-1)
    assert torch.allclose(rows, want, atol=1e-6) and torch.allclose(rows3, want, atol=1e-6)


def test_cli_errors_are_one_line(bundle_dir, monkeypatch):
    runner = CliRunner()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = runner.invoke(cli, ["serve", str(bundle_dir), "--port", str(port), "--device", "cpu"])
    assert res.exit_code == 1 and res.output.startswith(f"zoo: error: cannot listen on 127.0.0.1:{port}")
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, ["serve", "/no/such/bundle"])
    assert res.exit_code == 1 and res.output.startswith("zoo: error: no bundle at /no/such/bundle")
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)      # the serve extra not installed
    res = runner.invoke(cli, ["serve", str(bundle_dir)])
    assert res.exit_code == 1 and 'pip install "zoo-finetune[serve]"' in res.output


@pytest.mark.parametrize("flag,value", [("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"),
                                        ("--batch-wait-ms", "inf"), ("--batch-wait-ms", "nan")])
def test_limits_that_are_not_finite_are_refused_in_one_line(bundle_dir, flag, value):
    """QA: --max-upload-mb nan/inf was a traceback at int(); --batch-wait-ms inf a server that never answered."""
    res = CliRunner().invoke(cli, ["serve", str(bundle_dir), "--port", "0", "--device", "cpu", flag, value])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(f"zoo: error: invalid {flag[2:].replace('-', '_')}={value} ({flag}): allowed: ")
    assert res.output.rstrip().endswith("a finite number")


def test_help_imports_neither_torch_nor_fastapi():
    import subprocess
    import sys

    code = ("import sys; from zoo.cli import cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(cli, ['serve', '--help']); assert r.exit_code == 0; "
            "r = CliRunner().invoke(cli, ['push', '--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_page_in_headless_chromium(bundle_dir, tmp_path):
    from tests.conftest import load_script

    shot = load_script("screenshot_serve")
    dom = shot.render(bundle_dir, tmp_path / "page.png", image=make_image(tmp_path / "fox.png", 2, 64))
    assert 'data-done="1"' in dom and "model input" in dom and dom.count('class="row"') == 3
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_an_exif_rotated_upload_is_read_upright():
    """QA: /predict reported the stored 48x32 of a JPEG whose EXIF says to turn it (orientation 6): the
    upload is turned upright, as training read its images, so its size and pixels are the upright ones."""
    from zoo.serve import decode_upload

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(buf, "JPEG", exif=exif.tobytes())
    img, size = decode_upload(buf.getvalue(), "image/jpeg", "turned.jpg", ServeConfig())
    assert img.size == size == (32, 48) and img.mode == "RGB"


def test_a_big_jpeg_upload_is_decoded_as_zoo_predict_decodes_the_file(tmp_path):
    """QA (session 18): uploads were decoded at full size, where zoo predict (and validation) decode a JPEG over
    twice the resize at a reduced scale (PIL draft): a 1600x1200 photo reached a 224 px model as other pixels
    (8 levels apart on average). /predict still reports the image's own size, upright."""
    import numpy as np

    from finetune.data import load_image
    from zoo.serve import decode_upload

    exif = Image.Exif()
    exif[0x0112] = 6
    noise = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((800, 600)).save(tmp_path / "big.jpg", quality=90, exif=exif.tobytes())
    img, size = decode_upload((tmp_path / "big.jpg").read_bytes(), "image/jpeg", "big.jpg", ServeConfig(), 64)
    assert img.tobytes() == load_image(tmp_path / "big.jpg", 64).tobytes() and img.size == (75, 100)
    assert size == (600, 800)


def test_uploads_are_converted_to_rgb_as_training_reads_the_file(tmp_path):
    """QA: an upload was converted with Image.convert("RGB"), which clips a 16-bit PNG to white and turns
    transparent pixels black, where training (finetune.data.load_image) scales 16-bit and puts transparency
    on white: the served model saw other pixels than `zoo predict` and gave other answers."""
    import numpy as np

    from finetune.data import load_image
    from zoo.serve import decode_upload

    cases = {"g16.png": Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)),
             "clear.png": Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "la.png": Image.new("LA", (40, 40), (0, 0))}
    for name, img in cases.items():
        img.save(tmp_path / name)
        served, _ = decode_upload((tmp_path / name).read_bytes(), "image/png", name, ServeConfig())
        assert served.tobytes() == load_image(tmp_path / name).tobytes(), name


def test_a_long_strip_that_zoo_predict_reads_is_served(tmp_path):
    """QA (helper-45): a 20000x20 PNG (400,000 pixels) was refused with 413 "over the limit (40,000,000 pixels,
    16384 per side)" while zoo predict and training read it. The pixel limit bounds the decode and the eval
    transform crops a strip's long side before resizing, so the side limit guarded nothing: gone."""
    from finetune.data import load_image
    from zoo.serve import ImageRejected, decode_upload

    Image.new("RGB", (20000, 20), (200, 30, 60)).save(tmp_path / "strip.png")
    served, size = decode_upload((tmp_path / "strip.png").read_bytes(), "image/png", "strip.png", ServeConfig())
    assert size == (20000, 20) and served.tobytes() == load_image(tmp_path / "strip.png").tobytes()
    with pytest.raises(ImageRejected) as err:         # the pixel limit still holds
        decode_upload((tmp_path / "strip.png").read_bytes(), "image/png", "strip.png", ServeConfig(max_pixels=399_999))
    assert err.value.status == 413 and str(err.value) == "strip.png: 20000x20 pixels is over the limit (399,999 pixels)"


def test_every_file_type_training_reads_is_served(tmp_path):
    """QA (session 18): a model trained on TIFFs (a 32-bit float microscopy image) or PGMs answered 415 "not a
    JPEG, PNG, WebP, BMP or GIF image" for its own files; zoo predict read them."""
    import numpy as np

    from finetune.data import IMAGE_EXTENSIONS, load_image
    from zoo.serve import decode_upload

    grey = Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))     # mode F
    for ext in IMAGE_EXTENSIONS:
        path = tmp_path / f"x{ext}"
        (grey if ext in (".tif", ".tiff") else Image.new("RGB", (16, 16), (200, 30, 60)).convert(
            "L" if ext == ".pgm" else "RGB")).save(path)
        served, _ = decode_upload(path.read_bytes(), "application/octet-stream", path.name, ServeConfig())
        assert served.tobytes() == load_image(path).tobytes(), ext


def test_a_server_stopped_by_sigterm_exits_0_and_says_nothing(bundle_dir):
    """Review: once every command took SIGTERM as Ctrl-C, a service manager's normal stop of `zoo serve` (uvicorn
    shuts down, then raises SIGTERM again) ended as "zoo: interrupted", exit 130: a failed unit to systemd."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "zoo", "serve", str(bundle_dir), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ}, cwd=ROOT)
    try:
        line = proc.stdout.readline()            # "serving ... at URL": uvicorn is about to accept
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "interrupted" not in err, (proc.returncode, err)


@pytest.fixture
def alone(monkeypatch):
    """The servers a test starts as the process's only ones: the module's background server (``server``), started
    under an earlier test's warning filters (pytest's catch_warnings, left since), holds shared_pil_warnings."""
    import finetune.data.images as images

    monkeypatch.setattr(images, "_shared", [])


def test_the_server_runs_under_the_pil_filters_and_leaves_the_process_filters_as_they_were(alone):
    """Session 26 (the gap helper-85 found in zoo.predict, here in serve): each upload's own pil_warnings is
    catch_warnings, not thread-safe, and concurrent uploads are decoded on several threads, so one could be decoded
    without the filters another thread's exit had removed. The server now runs under them (every interleaving of
    the uploads' own then restores a list that holds them), and they go when it stops."""
    import warnings

    from zoo.serve import _served

    before = list(warnings.filters)
    seen: list[bool] = []

    class Server:
        def run(self, sockets):
            seen.append(any(f[0] == "error" and f[2] is Image.DecompressionBombWarning for f in warnings.filters))

    _served(Server(), None)
    assert seen == [True] and warnings.filters == before


def test_background_servers_stopped_in_any_order_keep_the_pil_filters_while_one_serves_and_leave_none(alone):
    """Review of session 26's _served: each background server (start_background: a thread each) entered its own
    catch_warnings, which restores on leaving the list it found. Of two servers stopped in the order they started,
    the first took PIL's filters from the second, still serving, and the second left them in the process for good.
    Now the first server to start sets them and the last to stop restores the process's filters, in either order."""
    import threading
    import warnings

    from zoo.serve import _served

    def pil_set() -> bool:
        return any(f[0] == "error" and f[2] is Image.DecompressionBombWarning for f in warnings.filters)

    class Server:
        def __init__(self) -> None:
            self.started, self.stop = threading.Event(), threading.Event()

        def run(self, sockets):
            self.started.set()
            self.stop.wait(30)

    for order in ((0, 1), (1, 0)):
        before = list(warnings.filters)
        servers = [Server(), Server()]
        threads = [threading.Thread(target=_served, args=(s, None), daemon=True) for s in servers]
        for s, t in zip(servers, threads):
            t.start()
            assert s.started.wait(30)
        first, last = order
        servers[first].stop.set()
        threads[first].join(30)
        assert pil_set(), order             # the other one still serves: its uploads are read under them
        servers[last].stop.set()
        threads[last].join(30)
        assert warnings.filters == before, order


@pytest.mark.skipif(shutil.which("node") is None, reason="runs the page's script in node")
def test_the_page_shows_labels_and_names_as_zoo_prints_them_invisible_characters_escaped():
    """QA (helper-137): the page put labels and file names in as they came (textContent: no HTML, but `cat` and
    `cat<U+200B>` looked the same, a right-to-left override turned the rest of a name around, a newline read as a
    space), where the console and zoo's pages escape them (finetune.core.io.printable). The page's script, run in
    node, shows each name as printable does."""
    import json
    import re
    import subprocess

    from finetune.core.io import _BLANK, printable
    from zoo.serve import _PAGE

    script = _PAGE[_PAGE.index("const HIDDEN"):_PAGE.index("function figure")]
    names = ["cat", "cat\u200b", "a\u202eb.png", "ca\nt", "d\tog", "x\x1b[31m", "nb\u00a0sp", "\u3164", "b\u2800",
             "tag\U000e0041", "<b>café 猫 ✓</b> \\x", "line\u2028sep", "soft\u00adhyphen", "",
             *(f"a{c}b" for c in sorted(_BLANK))]
    js = script + f"process.stdout.write(JSON.stringify({json.dumps(names)}.map(shown)));"
    got = json.loads(subprocess.run(["node", "-e", js], capture_output=True, text=True, check=True).stdout)
    assert got == [printable(n) for n in names]
    for put in ("shown(p.label)", "shown(res.image)", "shown(f.name)", "return shown(d === null"):
        assert put in _PAGE
    assert not re.search(r"el\('div', '', p\.label\)|textContent = res\.image", _PAGE)


@pytest.mark.skipif(shutil.which("node") is None, reason="runs the page's script in node")
def test_the_page_shows_any_error_answer_as_one_readable_line(server):
    """Session 35's leftover (helper-147): the page showed FastAPI's 422 answer, whose ``detail`` is a list of
    objects, as ``[object Object]``, and an answer that is no JSON (a proxy's 502 page) as the JSON parser's
    SyntaxError. The page's script, run in node on the server's own 422 and on other answers, shows one line."""
    import json
    import subprocess

    from zoo.serve import _PAGE

    fastapi = httpx.post(f"{server.url}/predict?topk=abc", files={"file": ("a.png", png_bytes(), "image/png")})
    assert fastapi.status_code == 422 and isinstance(fastapi.json()["detail"], list)      # FastAPI's own shape
    own = httpx.post(f"{server.url}/predict", files={"file": ("x.svg", b"<svg/>", "image/svg+xml")})
    assert own.status_code == 415
    fastapi_line = "; ".join(".".join(map(str, x["loc"])) + ": " + x["msg"] for x in fastapi.json()["detail"])
    cases = [  # (status, statusText, body) -> the line shown
        ((422, "", fastapi.text), fastapi_line),
        ((415, "", own.text), own.json()["detail"]),
        ((502, "Bad Gateway", "<html><body><h1>502 Bad Gateway</h1></body></html>"), "HTTP 502 Bad Gateway"),
        ((500, "", ""), "HTTP 500"),
        ((500, "", "null"), "HTTP 500"),
        ((400, "", '{"detail": {"why": "x"}}'), '{"why":"x"}'),
        ((400, "", '{"error": "x"}'), '{"error":"x"}'),
        ((400, "", '{"detail": ["a", {"msg": "b"}, 3]}'), "a; b; 3"),
        ((400, "", '{"detail": "two\\nlines\\u202e"}'), "two\\nlines\\u202e"),
    ]
    script = _PAGE[_PAGE.index("const HIDDEN"):_PAGE.index("function figure")]
    answers = [{"status": st, "statusText": text, "body": body} for (st, text, body), _ in cases]
    js = script + f"process.stdout.write(JSON.stringify({json.dumps(answers)}.map(a => problem(a, a.body))));"
    got = json.loads(subprocess.run(["node", "-e", js], capture_output=True, text=True, check=True).stdout)
    assert got == [want for _, want in cases] and got[0].startswith("query.topk: ")
    assert "problem(r, text)" in _PAGE and "doc.detail" not in _PAGE


@pytest.mark.skipif(shutil.which("node") is None, reason="runs the page's script in node")
def test_the_page_shows_each_probability_as_every_command_does():
    """Session 35's walk-through (helper-153): the page showed `(100 * prob).toFixed(1)%`, 100.0% for 0.999932, where
    `zoo predict` printed 99.99% (eval 100.0%, report.html 1.00). The page's script, run in node on the numbers the
    JSON answer carries (probability_value), shows what finetune.core.metrics.probability_text prints for each."""
    import json
    import random
    import subprocess

    from finetune.core.metrics import probability_text, probability_value
    from zoo.serve import _PAGE

    rng = random.Random(0)
    values = [0.999932, 0.99996, 0.99995, 0.9999499, 1.0, 0.0, 0.00004, 0.00005, 0.00006, 0.5, 0.125, 0.12125,
              0.0012345, *(rng.random() for _ in range(3000)), *(k / 20000 for k in range(20001)),
              *(rng.random() ** 12 for _ in range(500)), *(1 - rng.random() ** 12 for _ in range(500))]
    answered = [probability_value(v) for v in values]      # as the server's JSON gives them
    script = _PAGE[_PAGE.index("const HIDDEN"):_PAGE.index("function figure")]
    js = script + f"process.stdout.write(JSON.stringify({json.dumps(answered)}.map(percent)));"
    got = json.loads(subprocess.run(["node"], input=js, capture_output=True, text=True, check=True).stdout)
    assert got == [probability_text(v) for v in values]
    assert got[:2] == ["99.99%", ">99.99%"] and "percent(p.prob)" in _PAGE


def test_help_states_the_files_per_request_limit_the_server_applies():
    # QA (helper-137): 40 files in one curl answered 413 `40 files in one request; at most 32`, a limit
    # neither --help nor the guide stated
    out = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    assert f"at most {ServeConfig().max_files} a request" in out and "GET /info gives the limits" in out


def test_the_page_escapes_the_same_blank_drawn_characters_as_printable():
    """The page's script lists the characters printable draws blank though Python calls them printable
    (``finetune.core.io._BLANK``: Hangul fillers, the blank Braille pattern) by hand: the two lists must not drift
    (review, helper-138; the node test checks the escapes where node is installed)."""
    import re

    from finetune.core.io import _BLANK
    from zoo.serve import _PAGE

    hidden = re.search(r"const HIDDEN = /\[\\p\{C\}\\p\{Z\}((?:\\u[0-9a-f]{4})*)\]/gu;", _PAGE)
    assert hidden, "the page's HIDDEN pattern changed shape: keep it /[\\p{C}\\p{Z}<_BLANK as \\uXXXX>]/gu"
    listed = {chr(int(h, 16)) for h in re.findall(r"\\u([0-9a-f]{4})", hidden.group(1))}
    assert listed == set(_BLANK)
