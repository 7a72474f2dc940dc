#!/usr/bin/env python
"""Open `zoo serve`'s page in headless Debian chromium with one image predicted, save a PNG screenshot and
return the page's DOM (tests/zoo/test_serve.py::test_page_in_headless_chromium checks it).

The server runs on 127.0.0.1 (uvicorn in a thread); the image is served by the same server under /sample/
and the page's own `?try=/sample/NAME` path fetches it and posts it to /predict, as a pick would.

    scripts/screenshot_serve.py                                   # EfficientNet-Lite0 (demo extra) on Chelsea the cat
    scripts/screenshot_serve.py my-classifier --image cat.jpg --out page.png
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _chromium(args: list[str], profile: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is not installed: apt-get install -y chromium")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def render(model: str | Path, out: Path, image: Path, width: int = 1000, height: int = 620) -> str:
    from fastapi.responses import FileResponse

    from zoo.bundle import load_model
    from zoo.serve import ServeConfig, create_app, start_background

    bundle = load_model(str(model))
    app = create_app(bundle, ServeConfig(topk=5))
    image = Path(image).resolve()
    app.fastapi.add_api_route(f"/sample/{image.name}", lambda: FileResponse(image), include_in_schema=False)
    bg = start_background(app)
    try:
        url = f"{bg.url}/?try=/sample/{image.name}"
        with tempfile.TemporaryDirectory(prefix="zoo-chromium-") as profile:
            dom = _chromium(["--dump-dom", url], profile)
        with tempfile.TemporaryDirectory(prefix="zoo-chromium-") as profile:
            shot = _chromium([f"--screenshot={out.resolve()}", f"--window-size={width},{height}", url], profile)
    finally:
        bg.stop()
    if shot.returncode != 0 or not out.is_file():
        sys.exit(f"chromium failed ({shot.returncode}): {shot.stderr[-2000:]}")
    return dom.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="efficientnet_lite0")
    ap.add_argument("--image", type=Path, default=None, help="default: scikit-image's chelsea (a tabby cat)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "serve-page.png")
    a = ap.parse_args()
    image = a.image
    if image is None:
        from PIL import Image
        from skimage import data

        image = Path(tempfile.mkdtemp()) / "chelsea.jpg"
        Image.fromarray(data.chelsea()).save(image, quality=92)
    dom = render(a.model, a.out, image)
    print("prediction rows in the page:", dom.count('class="row"'))
    print(a.out)


if __name__ == "__main__":
    main()
