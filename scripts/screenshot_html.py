#!/usr/bin/env python
"""Render HTML pages in headless Debian chromium (no network, throwaway profile) and save PNG screenshots.

    scripts/screenshot_html.py PAGE.html OUT.png [--width 1000 --height 1400]
    scripts/screenshot_html.py PAGE.html OUT.png --width 390 --height 1600     # a phone
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(page: Path, out: Path, width: int, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="zoo-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
               page.resolve().as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not out.is_file():
        sys.exit(f"chromium failed ({r.returncode}): {r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("page", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--height", type=int, default=1400)
    a = ap.parse_args()
    screenshot(a.page, a.out, a.width, a.height)
    print(a.out)


if __name__ == "__main__":
    main()
