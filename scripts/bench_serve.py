#!/usr/bin/env python
"""Bounded load test of `zoo serve` on 127.0.0.1: N concurrent clients send M requests in all (one JPEG each,
POST /predict), then report errors, p50/p99 latency, throughput, the server's RSS before/after and how the
batcher grouped the images. The server is the real CLI (`zoo serve`) in its own process.

    scripts/bench_serve.py                        # efficientnet_lite0 (demo extra), 8 clients, 500 requests
    scripts/bench_serve.py my-classifier --clients 8 --requests 500 --device cpu
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import httpx
    from PIL import Image
    from skimage import data

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="efficientnet_lite0")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)     # 451x300
    jpeg = buf.getvalue()
    port = free_port()
    zoo = Path(sys.executable).with_name("zoo")
    proc = subprocess.Popen([str(zoo), "serve", a.model, "--port", str(port), "--device", a.device],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"server did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.2)
        for _ in range(3):    # warm-up: first forward passes allocate
            httpx.post(f"{url}/predict", files={"file": ("c.jpg", jpeg, "image/jpeg")}, timeout=60)
        rss_before = rss_mib(proc.pid)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        counter = iter(range(a.requests))

        def client() -> None:
            with httpx.Client(timeout=60) as c:
                while True:
                    with lock:
                        if next(counter, None) is None:
                            return
                    t = time.perf_counter()
                    try:
                        r = c.post(f"{url}/predict", files={"files": ("c.jpg", jpeg, "image/jpeg")})
                        ok = r.status_code == 200 and len(r.json()["results"]) == 1
                        why = "" if ok else f"HTTP {r.status_code}"
                    except httpx.HTTPError as err:
                        ok, why = False, type(err).__name__
                    dt = time.perf_counter() - t
                    with lock:
                        latencies.append(dt)
                        if not ok:
                            errors.append(why)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = rss_mib(proc.pid)
        info = httpx.get(f"{url}/info").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    q = statistics.quantiles(latencies, n=100)
    result = {"model": a.model, "device": info["device"], "clients": a.clients, "requests": len(latencies),
              "errors": len(errors), "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
              "max_ms": round(max(latencies) * 1000, 1), "req_per_s": round(len(latencies) / wall, 1),
              "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_after, 1),
              "batches": info["batches"], "cpus": os.cpu_count(), "torch_threads": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
