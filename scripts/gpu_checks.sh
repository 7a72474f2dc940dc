#!/usr/bin/env bash
# The device checks, as one script: GPU tests, the GPU benchmark, and a real `zoo finetune` on CUDA.
# Runs with the machine's own python3 (its torch/timm); the repo is put on PYTHONPATH, nothing installed.
# Usage (on a GPU machine): OUT=/tmp/gpu bash scripts/gpu_checks.sh
# Shorter, for the end-to-end question only (about 3 minutes):
#   PYTHONPATH=$PWD TQDM_DISABLE=1 python3 -m pytest -m gpu -q -p no:cacheprovider tests/finetune/test_decode.py
#   PYTHONPATH=$PWD TQDM_DISABLE=1 python3 scripts/bench_gpu.py --only e2e --repeats 2 --out $OUT/bench_e2e.md
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TQDM_DISABLE=1 HF_HUB_OFFLINE=1
OUT="${OUT:-/tmp/zoo-gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch,timm,torchvision;print('torch',torch.__version__,'timm',timm.__version__,'torchvision',torchvision.__version__,'cuda',torch.version.cuda)" | tee -a "$OUT/gpu.txt"
echo "== GPU tests (pytest -m gpu)"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/finetune/test_loop.py tests/finetune/test_data.py tests/finetune/test_decode.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
echo "== zoo finetune on CUDA (tiny generated folder, resnet18 random init, 2 epochs, full finetune)"
python3 - <<'PY' 2>&1 | tail -25 | tee "$OUT/finetune_cuda.log"
import sys, tempfile, pathlib
sys.path.insert(0, ".")
from tests.conftest import make_image_folder
from zoo.cli import cli
root = pathlib.Path(tempfile.mkdtemp())
make_image_folder(root / "data", per_class=64, size=64)
from PIL import Image
for png in list((root / "data").rglob("*.png")):   # JPEGs, so that --decode device goes through nvJPEG
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=90)
    png.unlink()
for decode in ("workers", "device"):
    code = cli.main(["finetune", "timm:resnet18", "--no-pretrained", "--data", str(root / "data"),
                     "--out", str(root / f"run-{decode}"), "--freeze", "none", "--head-epochs", "0", "--epochs", "2",
                     "--device", "cuda", "--batch-size", "32", "--decode", decode], standalone_mode=False)
    print("decode", decode, "exit", code, "files:", sorted(p.name for p in (root / f"run-{decode}").iterdir()))
PY
echo "== GPU benchmark"
timeout 330 python3 scripts/bench_gpu.py --out "$OUT/bench_gpu.md" 2>&1 | tail -60 | tee "$OUT/bench_gpu.log"
