"""Ray Serve's own floor on this machine: what an HTTP request costs through Serve when the application does nothing.

``bench_serve.py`` reports the retrieval endpoint's framework overhead (client latency minus the server's own
stages). This measures the part of it that is Ray's, with the endpoint's HTTP front and modes (``ray:``
defaults: HAProxy, throughput mode, the 0.5 s controller loop: ``runtime.serve_environment``) and a FastAPI route
that does no work: it parses the same JSON request body and returns the same size of JSON answer (50 hits). Three
systems, one client, one request at a time:

- ``uvicorn``: that FastAPI app in one uvicorn process, no Ray (the floor of FastAPI and HTTP alone);
- ``serve-0-hop``: the app as a Serve ingress deployment, answering by itself;
- ``serve-1-hop``: the ingress calls a second deployment (a deployment handle, one call per request) that returns
  the answer, as the colocated retrieval endpoint's ingress calls its version's replica.

Each system runs ``--rounds`` windows of ``--seconds`` s after a warm-up, in ABBA order; the report gives the
latency (p50, mean, p99) and the server processes' CPU per request (Ray's whole tree, or the uvicorn process).

    python benchmarks/serve_floor.py                 # ~3 min on 2 cores

Results: ``benchmarks/results/serve-floor.{md,json}``.
"""

# no `from __future__ import annotations`: Serve's class-based FastAPI routes read the annotations themselves (a
# string `Request` is taken for a query parameter), as in serve/ingress.py
import argparse
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_serve as bench  # its CPU snapshots of this process's descendants
import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ray_mgdspr.runtime import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
REQUEST = {"query": "red summer dress", "user_id": 12, "k": 50}
ANSWER = {"version": "v1", "count": 50, "filtered": 0, "fallback": None, "relaxed_to": None,
          "latency_ms": {"encode": 1.0, "search": 1.0, "merge": 0.1, "filter": 0.1, "total": 2.2},
          "items": [{"item_id": 1000 + i, "score": round(0.9 - i / 1000, 4), "channel": "embedding",
                     "title": "red summer dress cotton brand size m", "passes": True} for i in range(50)]}
"""The size and shape of a k = 50 retrieval answer."""


def app_of(call: Any = None) -> FastAPI:
    """The do-nothing route: read and parse the JSON body, answer ``ANSWER`` (from ``call()`` when given)."""
    app = FastAPI()

    @app.post("/v1/retrieve")
    async def retrieve(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        assert body["k"] == 50
        return JSONResponse(await call() if call is not None else ANSWER)

    return app


def uvicorn_main(port: int) -> None:
    import uvicorn

    uvicorn.run(app_of(), host="127.0.0.1", port=port, workers=1, log_level="warning", access_log=False)


def serve_app(hops: int) -> Any:
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
    class Answerer:
        async def answer(self) -> dict:
            return ANSWER

    fastapi_app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
    @serve.ingress(fastapi_app)
    class Front:
        def __init__(self, answerer: Any = None) -> None:
            self.answerer = answerer

        @fastapi_app.post("/v1/retrieve")
        async def retrieve(self, request: Request) -> JSONResponse:
            body = json.loads(await request.body())
            assert body["k"] == 50
            answer = ANSWER if self.answerer is None else await self.answerer.answer.remote()
            return JSONResponse(answer)

    return Front.bind(Answerer.bind()) if hops else Front.bind()


def window(url: str, seconds: float, uvicorn_pid: int | None) -> dict[str, Any]:
    """One client, back to back, for ``seconds``: latencies and the server's CPU (the uvicorn process when
    ``uvicorn_pid`` is given, else Ray's whole process tree)."""
    lat: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        a = bench.cpu_snapshot(uvicorn_pid)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            r = client.post("/v1/retrieve", json=REQUEST)
            lat.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200 and r.json()["count"] == 50, r.text[:300]
        b = bench.cpu_snapshot(uvicorn_pid)
    d = bench.cpu_delta(a, b)
    role = "monolith" if uvicorn_pid else "ray"  # bench_serve's names: the one-process server, or Ray's tree
    return {"latency_ms": lat, "requests": len(lat), "server_cpu_s": d[f"{role}_cores"] * d["wall_s"],
            "others_cores": d["others_cores"]}


def warm(url: str, seconds: float) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            client.post("/v1/retrieve", json=REQUEST)


def summary(windows: list[dict[str, Any]]) -> dict[str, float]:
    lat = np.concatenate([w["latency_ms"] for w in windows])
    n = sum(w["requests"] for w in windows)
    return {"requests": int(n), "p50_ms": round(bench.pct(lat, 50), 2),
            "mean_ms": round(float(lat.mean()), 2), "p99_ms": round(bench.pct(lat, 99), 2),
            "cpu_ms_per_request": round(1000 * sum(w["server_cpu_s"] for w in windows) / n, 2),
            "others_cores": round(max(w["others_cores"] for w in windows), 2)}


def render(result: dict[str, Any]) -> str:
    s = result["systems"]
    md = [f"# Ray Serve's floor on this machine ({result['date']}, {result['machine']})", "",
          f"Command: `{result['command']}`. A FastAPI route that parses a retrieval request's JSON body and answers a "
          "fixed 50-hit JSON body (no retrieval: no data involved), one client, one request at a time, "
          f"{result['rounds']} windows of {result['seconds']:g} s per system in ABBA order after "
          f"{result['warmup']:g} s of warm-up. Serve runs with the endpoint's local defaults ({result['front']}), "
          f"each deployment 0.25 CPU. Load average (1 min) {result['load_start']:.2f} at start, "
          f"{result['load_end']:.2f} at end.", "",
          "| system | requests | p50 ms | mean ms | p99 ms | server CPU ms / request | others' cores (max) |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for name, x in s.items():
        md.append(f"| {name} | {x['requests']:,} | {x['p50_ms']:.2f} | {x['mean_ms']:.2f} | {x['p99_ms']:.2f} | "
                  f"{x['cpu_ms_per_request']:.2f} | {x['others_cores']:.2f} |")
    base = s["uvicorn"]
    md += ["", "What Serve adds to the same route, against uvicorn (mean latency; CPU per request):", ""]
    for name in ("serve-0-hop", "serve-1-hop"):
        md.append(f"- {name}: +{s[name]['mean_ms'] - base['mean_ms']:.2f} ms, "
                  f"+{s[name]['cpu_ms_per_request'] - base['cpu_ms_per_request']:.2f} CPU ms")
    md.append(f"- the hop alone (1 hop - 0 hops): +{s['serve-1-hop']['mean_ms'] - s['serve-0-hop']['mean_ms']:.2f} "
              f"ms, +{s['serve-1-hop']['cpu_ms_per_request'] - s['serve-0-hop']['cpu_ms_per_request']:.2f} CPU ms")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--uvicorn", type=int, help=argparse.SUPPRESS)  # the uvicorn subprocess's port
    args = ap.parse_args()
    if args.uvicorn:
        uvicorn_main(args.uvicorn)
        return
    import ray
    from ray import serve

    from ray_mgdspr.config import RayConfig
    from ray_mgdspr.runtime import serve_environment
    from ray_mgdspr.serve.app import LOGGING  # no access log line per request, as the endpoint

    load_start = os.getloadavg()[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--uvicorn", str(port)], cwd=ROOT)
    cfg = RayConfig()
    serve_environment(cfg)
    ray.init(address="local", num_cpus=8, include_dashboard=cfg.dashboard, logging_level=logging.WARNING,
             log_to_driver=False)
    serve_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port}, logging_config=LOGGING)
    urls = {"uvicorn": f"http://127.0.0.1:{port}", "serve-0-hop": f"http://127.0.0.1:{serve_port}/zero",
            "serve-1-hop": f"http://127.0.0.1:{serve_port}/one"}
    windows: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    try:
        serve.run(serve_app(0), name="zero", route_prefix="/zero", logging_config=LOGGING)
        serve.run(serve_app(1), name="one", route_prefix="/one", logging_config=LOGGING)
        deadline = time.monotonic() + 60
        while True:  # the uvicorn subprocess answers
            try:
                httpx.post(urls["uvicorn"] + "/v1/retrieve", json=REQUEST, timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        order = list(urls)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                warm(urls[name], args.warmup)
                w = window(urls[name], args.seconds, proc.pid if name == "uvicorn" else None)
                windows[name].append(w)
                x = summary([w])
                print(f"round {r + 1} {name:12s}: p50 {x['p50_ms']:.2f} ms, mean {x['mean_ms']:.2f} ms, "
                      f"CPU {x['cpu_ms_per_request']:.2f} ms / request", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        serve.shutdown()
        ray.shutdown()
    front = (f"HTTP front {cfg.http_proxy}, throughput mode {'on' if cfg.serve_throughput_optimized else 'off'}, "
             f"controller loop {cfg.serve_control_loop_s:g} s, dashboard {'on' if cfg.dashboard else 'off'}")
    result = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cpu, python "
              f"{platform.python_version()}", "command": "python benchmarks/serve_floor.py"
              + " ".join(["", *sys.argv[1:]]).rstrip(), "front": front, "rounds": args.rounds,
              "seconds": args.seconds, "warmup": args.warmup, "load_start": load_start,
              "load_end": os.getloadavg()[0], "systems": {k: summary(v) for k, v in windows.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve-floor.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "serve-floor.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
