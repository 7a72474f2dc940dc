"""``zoo serve``: a local page and a JSON API to try a classifier, on FastAPI + uvicorn (the ``serve`` extra).

Routes
  GET  /          a page: pick or drop images, see the top-k as bars and the crop the model saw
  POST /predict   multipart form files under ``files`` (one or more) or ``file``; ``?topk=5&crop=false``;
                  answers ``{"model", "results": [{"image", "filename", "width", "height", "predictions":
                  [{"label", "prob"}], "crop"?}]}``: ``image`` is the uploaded file's name, the key ``zoo predict
                  --json`` names it by; ``filename``, the same value, is kept for clients written before
  GET  /info      labels, preprocessing, device, limits;  GET /health;  GET /docs, /openapi.json (FastAPI)

Hostile input is answered with a 4xx and never reaches the model: a body over ``max_upload_bytes`` or
without a Content-Length (413 / 411, checked before the body is read), more than ``max_files`` files (413),
an empty or non-image part (400 / 415: only JPEG, PNG, WebP, BMP and GIF are decoded; SVG and any other
declared type are refused), a truncated or corrupt image (400), a decompression bomb (413: the pixel count
is read from the header and checked before anything is decoded).

Batching: decoding and preprocessing run in the request's worker thread; the forward passes go through
one ``Batcher``, which gathers the tensors of concurrent requests (up to ``max_batch``, waiting at most
``batch_wait_ms`` for more once the first arrived) and runs them as one batch in a single model thread.
On a GPU this turns N small requests into one launch; on the CPU the default wait is 0 (a batch is what is
already queued). fastapi/uvicorn are imported only here, and this module only by ``zoo serve``.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations (UploadFile, imported
# inside create_app) as objects.
import asyncio
import base64
import concurrent.futures
import html
import io
import ipaddress
import json
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from finetune.core.metrics import probability_value
from finetune.data import pil_warnings
from finetune.data.images import EMPTY_FILE, decode_opened, open_image, shared_pil_warnings, verified
from zoo.errors import ServeError
from zoo.predict import eval_transform, model_input

__all__ = ["ServeConfig", "Batcher", "ImageRejected", "decode_upload", "create_app", "start_background",
           "serve", "require_serve_extra"]

# The files training reads (a model trained on TIFFs is tried with TIFFs); any other content is refused.
_SEND = "send JPEG, PNG, WebP, BMP, GIF, TIFF or PPM/PGM"
# The page at GET /: zoo/data/serve.html, __TITLE__ and __TOPK__ filled in per app.
_PAGE = (Path(__file__).resolve().with_name("data") / "serve.html").read_text(encoding="utf-8")
_EXTRA_HINT = 'zoo serve needs the serve extra: pip install "zoo-finetune[serve]" (fastapi, uvicorn, python-multipart)'


def require_serve_extra() -> None:
    """Raise ServeError with the install line when fastapi / uvicorn / python-multipart are missing."""
    try:
        # lazy: optional extra (pip install "zoo-finetune[serve]"), checked here
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (FastAPI's form parser)
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ServeError(f"{_EXTRA_HINT}; missing: {err.name}") from None


@dataclass
class ServeConfig:
    topk: int = 5                              # classes per image unless ?topk= says otherwise
    max_upload_bytes: int = 10 * 1024 * 1024   # per request, all files together
    max_files: int = 32                        # per request
    # width x height, read from the header before decoding: what bounds the decode's time and memory. No limit
    # per side: a 20000x20 strip (zoo predict and training read it) costs 400,000 pixels, and the evaluation
    # transform crops its long side to twice the short before resizing (finetune.data.transforms.LimitAspect).
    max_pixels: int = 40_000_000
    max_batch: int = 16                        # images per forward pass
    batch_wait_ms: float = 0.0                 # how long the batcher waits for more once one arrived


class ImageRejected(Exception):
    """An upload that is not a usable image; ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, content_type: str | None, name: str, cfg: ServeConfig, min_size: int | None = None):
    """(PIL RGB image, its upright (width, height)) from an uploaded part, or ImageRejected (4xx) saying why not.

    Decoded as training and zoo predict decode a file (``finetune.data.images.decode_opened``): given the
    transform's ``min_size``, a big JPEG at the same reduced scale, so the model sees the pixels it would see
    in ``zoo predict`` (a full-size decode resized differently). The size is the image's, not the reduced one.
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise ImageRejected(415, f"{name}: content type {ctype!r} is not an image; {_SEND}")
    if ctype == "image/svg+xml":
        raise ImageRejected(415, f"{name}: SVG is not decoded (vector images can hide scripts and bombs); "
                                 "send a raster image")
    if not data:
        raise ImageRejected(400, f"{name}: {EMPTY_FILE}")
    with pil_warnings():
        try:
            buf = io.BytesIO(data)
            img = open_image(buf)
        except UnidentifiedImageError:
            raise ImageRejected(415, f"{name}: not an image zoo reads; {_SEND}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected(413, f"{name}: image dimensions are too large (decompression bomb)") from None
        except Exception as err:  # a header Pillow cannot parse
            raise ImageRejected(400, f"{name}: unreadable image header ({type(err).__name__})") from None
        w, h = img.size
        if w < 1 or h < 1 or w * h > cfg.max_pixels:
            raise ImageRejected(413, f"{name}: {w}x{h} pixels is over the limit ({cfg.max_pixels:,} pixels)")
        try:
            # as training reads a file: a PNG's checksums checked, upright, 16-bit scaled, alpha on white
            rgb = decode_opened(verified(img, buf), min_size)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRejected(413, f"{name}: image dimensions are too large (decompression bomb)") from None
        except Exception as err:  # truncated or corrupt data: OSError, SyntaxError, ValueError...
            raise ImageRejected(400, f"{name}: truncated or corrupt image ({type(err).__name__}: "
                                     f"{str(err)[:80]})") from None
    return rgb, ((w, h) if rgb.size == img.size else (h, w))     # turned upright by its EXIF: (h, w)


class Batcher:
    """Gathers single-image tensors from concurrent requests into batches for one model thread.

    ``submit`` (a coroutine) returns the softmax row of its tensor. ``sizes`` records each batch's size.
    """

    def __init__(self, model: Any, max_batch: int = 16, wait_ms: float = 0.0) -> None:
        self.model = model
        self.max_batch = max(1, int(max_batch))
        self.wait = max(0.0, float(wait_ms)) / 1000.0
        self.sizes: list[int] = []
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoo-model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=False)

    async def submit(self, tensor: Any) -> Any:
        assert self._queue is not None, "Batcher.start() first"
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((tensor, fut))
        return await fut

    def _forward(self, tensors: list[Any]) -> Any:
        with torch.inference_mode():
            try:
                device = next(self.model.parameters()).device
            except StopIteration:
                device = torch.device("cpu")
            return self.model(model_input(torch.stack(tensors), device)).float().softmax(dim=-1).cpu()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.wait
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), timeout=left))
                except asyncio.TimeoutError:
                    break
            items = [(t, f) for t, f in items if not f.cancelled()]   # clients that went away
            if not items:
                continue
            self.sizes.append(len(items))
            try:
                probs = await loop.run_in_executor(self._pool, self._forward, [t for t, _ in items])
            except Exception as err:  # a model failure answers every waiting request, the loop goes on
                for _, f in items:
                    if not f.done():
                        f.set_exception(err)
                continue
            for i, (_, f) in enumerate(items):
                if not f.done():
                    f.set_result(probs[i])


def _crop_png(tensor: Any, data_config: dict) -> str:
    """The model's input (after resize + crop), un-normalised, as a PNG data URL."""
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    pixels = (tensor.float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _BodyLimit:
    """ASGI middleware: a POST needs a Content-Length no larger than the limit (413 / 411 before reading)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            status, message = None, ""
            if length is None:
                status, message = 411, "send a Content-Length (chunked uploads are not accepted)"
            else:
                try:
                    n = int(length)
                except ValueError:
                    n = -1
                if n < 0:
                    status, message = 400, "bad Content-Length"
                elif n > self.limit:
                    status, message = 413, f"the upload ({n:,} bytes) is over the limit ({self.limit:,} bytes)"
            if status is not None:
                body = json.dumps({"detail": message}).encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def create_app(bundle: Any, cfg: ServeConfig | None = None, title: str | None = None) -> Any:
    """The FastAPI app for ``bundle`` (a ``zoo.bundle.Bundle``: model, data_config, labels, metadata)."""
    require_serve_extra()
    # lazy: optional extra (the serve extra), checked by require_serve_extra above
    from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    from fastapi.responses import HTMLResponse
    from fastapi.concurrency import run_in_threadpool

    cfg = cfg or ServeConfig()
    transform = eval_transform(bundle.data_config)
    labels = list(bundle.labels)
    name = title or str(bundle.metadata.get("model") or (bundle.path.name if bundle.path else "model"))
    batcher = Batcher(bundle.model, cfg.max_batch, cfg.batch_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"zoo serve: {name}", version="1", lifespan=lifespan,
                  description="Top-k classes for images. POST images as multipart form files under `files` "
                              "(one or more) or `file`. Each result names its image by `image`, as `zoo predict "
                              "--json` does; `filename`, the same name, is kept for older clients.")
    app.state.batcher = batcher
    app.state.config = cfg

    def prepare(data: bytes, ctype: str | None, filename: str) -> tuple[Any, tuple[int, int]]:
        img, size = decode_upload(data, ctype, filename, cfg, getattr(transform, "min_size", None))
        return transform(img), size

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _PAGE.replace("__TITLE__", _html_escape(name)).replace("__TOPK__", str(min(cfg.topk, len(labels))))

    @app.get("/health", summary="Liveness")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/info", summary="Model, classes, preprocessing and limits")
    def info() -> dict:
        return _info(bundle, name, labels, cfg, batcher)

    @app.post("/predict", summary="Top-k classes per image")
    async def predict(files: list[UploadFile] | None = File(None, description="one or more images"),
                      file: UploadFile | None = File(None, description="one image (alternative to `files`)"),
                      topk: int = Query(cfg.topk, ge=1, le=1000, description="classes per image"),
                      crop: bool = Query(False, description="also return the crop the model saw (PNG data URL)"),
                      ) -> dict:
        uploads = [u for u in (files or []) if u is not None] + ([file] if file is not None else [])
        if not uploads:
            raise HTTPException(400, "send one or more images as multipart form files under 'files' (or 'file')")
        if len(uploads) > cfg.max_files:
            raise HTTPException(413, f"{len(uploads)} files in one request; at most {cfg.max_files}")
        prepared = []
        for i, up in enumerate(uploads):
            filename = up.filename or f"file {i + 1}"
            data = await up.read()
            try:
                prepared.append((filename, *await run_in_threadpool(prepare, data, up.content_type, filename)))
            except ImageRejected as err:
                raise HTTPException(err.status, str(err)) from None
        rows = await asyncio.gather(*(batcher.submit(t) for _, t, _ in prepared))
        return {"model": name, "results": _results(prepared, rows, min(int(topk), len(labels)), labels, crop,
                                                   bundle.data_config)}

    wrapped = _BodyLimit(app, cfg.max_upload_bytes)
    wrapped.fastapi = app          # tests and benchmarks read app.state.batcher through it
    return wrapped


def _info(bundle: Any, name: str, labels: list[str], cfg: ServeConfig, batcher: Batcher) -> dict:
    """GET /info: the model, its classes and preprocessing, the device, the limits, the batches so far."""
    try:
        device = str(next(bundle.model.parameters()).device)
    except StopIteration:
        device = "cpu"
    return {"model": name, "labels": labels, "num_classes": len(labels),
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in bundle.data_config.items()},
            "device": device, "max_upload_bytes": cfg.max_upload_bytes, "max_files": cfg.max_files,
            "max_pixels": cfg.max_pixels, "max_batch": cfg.max_batch,
            "batches": {"count": len(batcher.sizes), "images": sum(batcher.sizes),
                        "largest": max(batcher.sizes, default=0)}}


def _results(prepared: list, rows: Sequence[torch.Tensor], k: int, labels: list[str], crop: bool,
             data_config: dict) -> list[dict]:
    """POST /predict's results: per (filename, tensor, (w, h)) and its probabilities, the top ``k`` classes
    (and with ``crop`` the crop the model saw, as a PNG data URL)."""
    results = []
    for (filename, tensor, (w, h)), probs in zip(prepared, rows):
        values, idx = probs.topk(k)
        item = {"image": filename, "filename": filename, "width": w, "height": h,     # (filename: the old key)
                "predictions": [{"label": labels[j], "prob": probability_value(v)}
                                for v, j in zip(values.tolist(), idx.tolist())]}
        if crop:
            item["crop"] = _crop_png(tensor, data_config)
        results.append(item)
    return results


def _html_escape(text: str) -> str:
    return html.escape(text, quote=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        hint = "choose another --port" if err.errno in (98, 48, 10048) else "check --host"
        raise ServeError(f"cannot listen on {host}:{port} ({err.strerror or err}); {hint}") from None
    return sock


@dataclass
class Background:
    url: str
    server: Any
    thread: threading.Thread
    app: Any = None
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_background(app: Any, host: str = "127.0.0.1", port: int = 0) -> Background:
    """Run ``app`` with uvicorn in a daemon thread (tests, benchmarks); returns once it accepts connections."""
    # lazy: optional extra (the serve extra)
    import uvicorn

    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=_served, args=(server, sock), daemon=True, name="zoo-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServeError("the server did not start; set ZOO_DEBUG=1 for details")
        time.sleep(0.02)
    return Background(url=f"http://{host}:{sock.getsockname()[1]}", server=server, thread=thread, app=app)


def _served(server: Any, sock: socket.socket) -> None:
    """``server.run`` under PIL's filters. Each upload is decoded under its own ``pil_warnings`` too, but that is
    ``catch_warnings``, which is not thread-safe, and concurrent uploads are decoded on several threads: one thread
    restored the filters another had set, so an upload could be decoded without them (a 1x-2x decompression bomb let
    through as a warning) or the process kept them. Set around the servers, every interleaving restores a list
    that holds them (as zoo.predict does around its decoding threads); shared by the background servers' threads,
    which stop in any order."""
    with shared_pil_warnings():
        server.run(sockets=[sock])


def serve(bundle: Any, host: str = "127.0.0.1", port: int = 8000, cfg: ServeConfig | None = None,
          on_ready: Any = None) -> None:
    """Serve ``bundle`` until interrupted (Ctrl-C)."""
    require_serve_extra()
    # lazy: optional extra (the serve extra), checked by require_serve_extra above
    import uvicorn

    app = create_app(bundle, cfg)
    sock = _bind(host, port)
    # uvicorn shuts down on SIGTERM, then raises it again for the handler it found: the CLI's (SIGTERM as
    # Ctrl-C) would call a service's normal stop "interrupted", exit 130; a stopped server ends with 0
    in_main = threading.current_thread() is threading.main_thread()
    # uvicorn's Config sets up logging (dictConfig, under logging's locks): before the "serving" line, so that a
    # SIGTERM sent on that line cannot interrupt it half-way (a lock left taken: exit 1, a traceback)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    previous = signal.signal(signal.SIGTERM, _stopped) if in_main else None
    try:
        if on_ready is not None:
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"http://{shown}:{sock.getsockname()[1]}", _is_loopback(host))
        _served(server, sock)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _stopped(signum: int, frame: Any) -> None:
    raise SystemExit(0)
