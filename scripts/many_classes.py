"""Many-class image folders for the audit of docs/benchmarks.md "Many classes (helper-128)": C classes of 2-8
images each with a long tail (every 10th class 1 image, the next 2, the next 3), class names of varied length, PNG
and JPEG of 32-64 px, one colour and shape per class. Behaviour and scale only, not accuracy.

    .venv/bin/python scripts/many_classes.py OUT_DIR 300 [SEED]     # c300: 1,434 images; 1000 -> c1000
"""
import random
import sys

from pathlib import Path

from PIL import Image, ImageDraw

out, C, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
rng = random.Random(seed)
words = "red blue tit wren finch larch oak maple golden crowned kinglet northern cardinal eastern bluebird".split()
for c in range(C):
    name = f"{c:04d}_" + "_".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
    if c % 10 == 0: n = 1
    elif c % 10 == 1: n = 2
    elif c % 10 == 2: n = 3
    else: n = rng.randint(4, 8)
    base = tuple(rng.randint(0, 255) for _ in range(3))
    shape = c % 4
    for i in range(n):
        size = rng.choice([32, 48, 64])
        jit = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in base)
        img = Image.new("RGB", (size, size), tuple(255 - v for v in jit))
        d = ImageDraw.Draw(img); m = rng.randint(2, size // 6)
        [d.ellipse, d.rectangle, d.chord, d.pieslice][shape]([m, m, size - m, size - m], fill=jit, **({"start": 30, "end": 300} if shape >= 2 else {}))
        p = out / name / f"img{i}.{'png' if i % 2 else 'jpg'}"
        p.parent.mkdir(parents=True, exist_ok=True); img.save(p)
