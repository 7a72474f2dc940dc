"""``zoo serve``: a local page + JSON API to try a model. A thin command over zoo.serve (FastAPI + uvicorn,
imported only when the command runs)."""
from __future__ import annotations

import click

from zoo.cli.app import cli
from zoo.cli.console import echo
from zoo.cli.options import FiniteFloatRange, IntRange, RangedOption

__all__ = ["serve_cmd"]


@cli.command("serve", short_help="Try a model in the browser, or through a JSON API.")
@click.argument("model", metavar="BUNDLE")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default answers this machine only; 0.0.0.0 exposes the model "
                   "to the network.")
@click.option("--port", type=IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free).")
@click.option("--topk", type=IntRange(min=1), default=5, show_default=True,
              help="Classes per image unless the request says ?topk=N.")
@click.option("--max-upload-mb", type=FiniteFloatRange(0.01, 1_000_000), default=10.0, show_default=True,
              help="Largest request body (all images together); larger uploads get 413.")
@click.option("--max-pixels", type=IntRange(min=1), default=40_000_000, show_default=True,
              help="Largest image (width x height, read from its header before decoding); 413 above.")
@click.option("--max-batch", type=IntRange(min=1), default=16, show_default=True,
              help="Images of concurrent requests run together in one forward pass.")
@click.option("--batch-wait-ms", type=FiniteFloatRange(0, 60_000), default=None, cls=RangedOption,
              default_text="5 on a GPU, 0 on the CPU", help="Wait this long for more images once one arrived.")
@click.option("--device", default="auto", show_default=True,
              help="Where to run: auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N, mps.")
def serve_cmd(model: str, host: str, port: int, topk: int, max_upload_mb: float, max_pixels: int,
              max_batch: int, batch_wait_ms: float | None, device: str) -> None:
    """Serve BUNDLE (a `zoo export` folder, a registry name or hf-hub:OWNER/NAME) on a local page where you
    pick or drop images and see the top-k classes as bars with the crop the model saw, and as a JSON API:
    POST /predict with images as multipart form files under `files` (or `file`), at most 32 a request, all
    answered or none (one bad file: 400 naming it). GET /info gives the limits; OpenAPI docs at /docs.

    Needs the serve extra: pip install "zoo-finetune[serve]". Ctrl-C stops it.

    \b
    Examples:
      zoo serve my-classifier                       # then open http://127.0.0.1:8000
      zoo serve my-classifier --port 8080 --topk 3
      curl -F files=@cat.jpg -F files=@dog.jpg http://127.0.0.1:8000/predict
    """
    # lazy: zoo --help must not import fastapi (an optional extra) nor torch
    from zoo.serve import ServeConfig, require_serve_extra

    require_serve_extra()        # before the model is loaded: a missing extra is said at once
    # lazy: zoo --help must not import torch
    from finetune.engine import resolve_device
    from zoo.bundle import load_model
    from zoo.serve import serve

    dev = resolve_device(device)
    bundle = load_model(model, device=dev)
    wait = batch_wait_ms if batch_wait_ms is not None else (5.0 if str(dev).startswith("cuda") else 0.0)
    cfg = ServeConfig(topk=topk, max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
                      max_batch=max_batch, batch_wait_ms=wait)

    def ready(url: str, loopback: bool) -> None:
        echo(f"serving {model} ({len(bundle.labels)} classes, {dev}) at {url}  (API: {url}/predict, docs: {url}/docs; "
             "Ctrl-C stops)")
        if not loopback:
            echo(f"zoo: warning: listening on {host}: anyone who can reach this machine can use the model",
                 err=True)

    serve(bundle, host=host, port=port, cfg=cfg, on_ready=ready)
