"""Serving load test: dynamic batching vs one request at a time, and the guard's added latency.

    .venv/bin/python benchmarks/serve_load.py [--concurrency 1 8 32] [--repeats 3] [--max-tokens 16]

The server is a separate process (`--serve`): the quickstart recipe's Serve app on the bundled
SmolLM2-135M-Instruct (the bare base model, so the numbers do not depend on what is registered), on a
local Ray. This process is the client: at each concurrency level, that many clients send chat
requests back to back (greedy, `max_tokens` each, the same fixed prompts for every side) until
`requests = max(8, 2 x clients)` are answered; throughput counts completion tokens per second of wall
time; latency is per request. Each level runs `--repeats` times and the table shows medians.

Sides, each its own server process:
  (a) unbatched: serve.batching.max_batch_size=1, guard on  -- the baseline
  (b) batched:   serve.batching.max_batch_size=16 (wait 150 ms: on a busy 2-core machine a closed loop of
                 clients re-sends its requests spread over ~100 ms; with 20 ms, batches held 2-3 requests
                 and throughput was 1.6x instead of 4x, measured), guard on
  (c) batched, guard off: (b) minus (c) at 1 client is the guard's added latency; the router also
      measures every guard call (round trip to the guard deployment), shown as its own p50 / p99.
The guard is the one `raytune-app guard train` registered (models:/guard@champion); without one,
sides (a) and (b) run with the guard off and the guard rows are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Order #A1234 from Jane Doe (jane@example.com): 2 blue mugs arrived broken. Please replace them quickly.",
    "Where is my parcel? Ordered three notebooks last week, order B-77.",
    "Hi, I want to cancel order 5521 for one desk lamp, it is no longer needed.",
    "The invoice for order Z-9 lists 4 chairs but I only bought 2. Can you fix it?",
    "Quick question: do you ship to Norway, and how long does it take?",
    "My name is Tom Lee, order 8812, the headphones stopped working after a day. Refund please.",
    "Please change the delivery date of order 3141 to 2026-12-02.",
    "Is the green kettle back in stock? I would order two.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_forever(port: int, batch: int, guard: bool, out: str) -> None:
    """The server side: start the app, print one READY line, keep serving until killed."""
    import ray

    from raytune_app import config
    from raytune_app.serve.app import run

    overrides = [
        f"run.output_dir={out}",
        f"serve.port={port}",
        "serve.champion=base",
        "serve.backup=null",
        f"serve.batching.max_batch_size={batch}",
        "serve.batching.batch_wait_timeout_s=0.15",
        "serve.guard.mode=" + ("enforce" if guard else "'off'"),
        "serve.limits.max_tokens=256",
        f"serve.guard.tracking_uri=sqlite:///{ROOT}/runs/guard/mlflow.db",
    ]
    recipe = config.load(ROOT / "recipes" / "quickstart.yaml", overrides)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    run(recipe)
    print("READY", flush=True)
    while True:
        time.sleep(3600)


def start_server(batch: int, guard: bool, out: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), str(batch), str(int(guard)), out],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    for line in server.stdout:
        if line.strip() == "READY":
            return server, f"http://127.0.0.1:{port}"
    raise RuntimeError(f"the server (batch {batch}, guard {guard}) exited before it was ready")


async def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    latencies, tokens, queue = [], 0, list(range(requests))

    async def client(http):
        nonlocal tokens
        while queue:
            i = queue.pop()
            began = time.perf_counter()
            r = await http.post(
                url + "/v1/chat/completions",
                json={
                    "model": "quickstart",
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                },
            )
            r.raise_for_status()
            latencies.append(time.perf_counter() - began)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - began
    latencies.sort()
    return {
        "tokens_per_s": tokens / wall,
        "requests_per_s": requests / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def measure_side(name: str, batch: int, guard: bool, args, out: str) -> dict:
    server, url = start_server(batch, guard, out)
    try:
        asyncio.run(load(url, 2, 4, args.max_tokens))  # warm-up: first forward passes allocate
        results = {}
        for clients in args.concurrency:
            runs = [asyncio.run(load(url, clients, max(8, 2 * clients), args.max_tokens)) for _ in range(args.repeats)]
            results[clients] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {name}: {clients} clients: {results[clients]}", file=sys.stderr, flush=True)
        import httpx

        stats = httpx.get(url + "/v1/stats").json()
        return {"levels": results, "guard_ms": stats["guard"]["latency_ms"], "batch_sizes": stats["llm"]["batch_sizes"]}
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "BATCH", "GUARD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        port, batch, guard, out = args.serve
        serve_forever(int(port), int(batch), guard == "1", out)
        return

    import tempfile

    from raytune_app.registry import store

    try:
        store.version_of(f"sqlite:///{ROOT}/runs/guard/mlflow.db", "models:/guard@champion")
        guard = True
    except Exception:
        print("no registered guard (raytune-app guard train): guard rows skipped", file=sys.stderr)
        guard = False
    out = tempfile.mkdtemp(prefix="serve-bench-")
    sides = {
        "unbatched (max batch 1)": measure_side("unbatched", 1, guard, args, out),
        "batched (max batch 16)": measure_side("batched", 16, guard, args, out),
    }
    if guard:
        sides["batched, guard off"] = measure_side("batched, guard off", 16, False, args, out)
    base = sides["unbatched (max batch 1)"]["levels"]
    print(
        f"\nSmolLM2-135M-Instruct on {os.cpu_count()} CPUs, max_tokens {args.max_tokens}, medians of "
        f"{args.repeats} runs\n"
    )
    print(f"{'side':<26}{'clients':>8}{'tokens/s':>10}{'x base':>8}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}")
    for name, side in sides.items():
        for clients, r in side["levels"].items():
            ratio = r["tokens_per_s"] / base[clients]["tokens_per_s"]
            print(
                f"{name:<26}{clients:>8}{r['tokens_per_s']:>10.1f}{ratio:>8.2f}{r['requests_per_s']:>8.2f}"
                f"{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}"
            )
    if guard:
        on, off = (
            sides["batched (max batch 16)"]["levels"][args.concurrency[0]],
            sides["batched, guard off"]["levels"][args.concurrency[0]],
        )
        print(
            f"\nguard call, measured by the router (batched side): p50 "
            f"{sides['batched (max batch 16)']['guard_ms']['p50']} ms, "
            f"p99 {sides['batched (max batch 16)']['guard_ms']['p99']} ms"
        )
        print(
            f"end-to-end at {args.concurrency[0]} client(s), guard on - off: p50 "
            f"{1000 * (on['p50_s'] - off['p50_s']):+.1f} ms, "
            f"p99 {1000 * (on['p99_s'] - off['p99_s']):+.1f} ms"
        )
    print("batch sizes seen (batched side):", json.dumps(sides["batched (max batch 16)"]["batch_sizes"]))


if __name__ == "__main__":
    main()
