"""Serving load test: the vLLM backend against the transformers backend, same weights, same machine, one run.

    .venv/bin/python benchmarks/serve_load.py [--sides transformers vllm] [--concurrency 1 8 32] [--repeats 3]
        [--max-tokens 32] [--model bundled:smollm2-135m-instruct] [--precision fp32] [--gpu]
        [--set serve.KEY=VALUE ...] [--cpu-by-process]

Each side is a separate server process (`--serve`): the quickstart recipe's Serve app on `--model` (the bare
base model, so the numbers do not depend on what is registered), on a local Ray of its own. All sides are up
at once and the levels are interleaved (side A at 1 client, side B at 1 client, ..., then the next repeat), so
a burst of load from other work on a shared machine hits every side alike. At each level that many clients send
streamed chat requests back to back (greedy, `max_tokens`, the same prompts for every side) until
`requests = max(8, 2 x clients)` are answered. Per level: completion tokens per second of wall time, p50 / p99
request latency, p50 time to first token (the first content chunk) and how many requests the server shed
(429 / 503: the client waits Retry-After and asks again, as a well-behaved client does), medians over `--repeats`.
`--set` passes recipe overrides to every side's server; `--cpu-by-process` prints, after each level, the CPU
seconds each process of the machine spent in it (engine, proxy, ingress, router, this load generator).

Sides:
  transformers  serve.backend=transformers with its best CPU setting (dynamic batching up to 16, 150 ms wait)
  vllm          serve.backend=vllm: Ray Serve LLM's LLMServer (vLLM continuous batching) behind our
                ingress -> guard -> router
  serve-llm     Ray Serve LLM alone (build_openai_app with the same LLMConfig, no guard, no router): the
                difference in time to first token from `vllm` is what our ingress + guard + router add
Both of our sides run the guard registered by `raytune-app guard train` (models:/guard@champion) when
there is one, else none. benchmarks/gpu_serve.sh runs this on a GPU with a 0.5B model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
GUARD_URI = f"sqlite:///{ROOT}/runs/guard/mlflow.db"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(side: str, port: int, out: str, model: str, precision: str, guard: bool, gpu: bool, extra: list[str]):
    from raytune_app import config

    overrides = [
        f"run.output_dir={out}",
        f"model.path={model}",
        f"serve.port={port}",
        "serve.name=bench",
        "serve.champion=base",
        "serve.backup=null",
        f"serve.precision={precision}",
        "serve.limits.max_tokens=512",
        "serve.limits.default_temperature=0.0",
        "serve.guard.mode=" + ("enforce" if guard else "'off'"),
        f"serve.guard.tracking_uri={GUARD_URI}",
        "serve.vllm.max_num_seqs=64",
        "serve.vllm.max_model_len=2048",
    ]
    if side == "transformers":
        wait = 0.01 if gpu else 0.15  # a closed loop of CPU clients re-sends spread over ~100 ms (serve/settings.py)
        overrides += [
            "serve.backend=transformers",
            "serve.batching.max_batch_size=16",
            f"serve.batching.batch_wait_timeout_s={wait}",
        ]
    else:
        overrides += ["serve.backend=vllm"]
    if gpu:
        overrides += ["serve.deployments.llm.num_gpus=1", "serve.deployments.llm.num_cpus=2"]
    return config.load(ROOT / "recipes" / "quickstart.yaml", overrides + extra)


def serve_forever(
    side: str, port: int, out: str, model: str, precision: str, guard: bool, gpu: bool, extra: list[str]
) -> None:
    """The server side: start the app, print one READY line, keep serving until killed."""
    from _harness import start_ray

    recipe = _recipe(side, port, out, model, precision, guard, gpu, extra)
    start_ray(num_cpus=max(2, os.cpu_count()))
    if side == "serve-llm":
        from ray import serve
        from ray.serve.llm import build_openai_app

        from raytune_app.serve import app
        from raytune_app.serve.vllm_server import llm_config

        spec = app.plan(recipe)["llm"]
        llm = llm_config(spec, app._options(recipe, "llm"))
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app({"llm_configs": [llm]}), name="serve-llm", route_prefix="/")
    else:
        from raytune_app.serve.app import run

        run(recipe)
    print("READY", flush=True)
    while True:
        time.sleep(3600)


def start_server(side: str, args, out: str, guard: bool) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, __file__, "--serve", side, str(port), out, args.model, args.precision, str(int(guard))]
    server = subprocess.Popen(
        command + (["--gpu"] if args.gpu else []) + (["--set", *args.set] if args.set else []),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    for line in server.stdout:
        if line.strip() == "READY":
            return server, f"http://127.0.0.1:{port}"
    raise RuntimeError(f"the {side} server exited before it was ready")


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    latencies, ttfts, tokens, shed, queue = [], [], 0, 0, list(range(requests))

    async def client(http):
        nonlocal tokens, shed
        while queue:
            i = queue.pop()
            body = {
                "model": model,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            }
            began, first = time.perf_counter(), None
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code in (429, 503):  # shed by the server's backpressure: back off as told, ask again
                    shed += 1
                    queue.append(i)
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                    continue
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - began
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - began)
            ttfts.append(first if first is not None else latencies[-1])

    async with httpx.AsyncClient(timeout=900) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - began
    latencies.sort()
    return {
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "ttft_p50_s": statistics.median(ttfts),
        "shed": shed,  # requests refused with 429 / 503 and sent again after Retry-After
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sides", nargs="+", default=["transformers", "vllm"], choices=["transformers", "vllm", "serve-llm"]
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--gpu", action="store_true", help="give each LLM replica one GPU")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for every side's server (e.g. serve.vllm.stream_interval_ms=250)",
    )
    parser.add_argument(
        "--cpu-by-process", action="store_true", help="after each level, print where the machine's CPU went"
    )
    parser.add_argument(
        "--serve", nargs=6, metavar=("SIDE", "PORT", "OUT", "MODEL", "PRECISION", "GUARD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        side, port, out, model, precision, guard = args.serve
        serve_forever(side, int(port), out, model, precision, guard == "1", args.gpu, args.set)
        return

    import tempfile

    from _harness import CpuByProcess

    from raytune_app.registry import store

    try:
        store.version_of(GUARD_URI, "models:/guard@champion")
        guard = True
    except Exception:
        print("no registered guard (raytune-app guard train): the guard is off on every side", file=sys.stderr)
        guard = False
    out = tempfile.mkdtemp(prefix="serve-bench-")
    servers = {}
    try:
        for side in args.sides:  # one at a time: engine starts compete for the same cores
            began = time.time()
            servers[side] = start_server(side, args, out, guard)
            print(f"  {side}: up in {time.time() - began:.0f} s", file=sys.stderr, flush=True)
        model = {side: ("base" if side != "serve-llm" else "bench") for side in args.sides}
        for side, (_, url) in servers.items():  # warm-up: first passes allocate, compile, fill caches
            asyncio.run(load(url, model[side], 4, 8, args.max_tokens))
        runs = {side: {c: [] for c in args.concurrency} for side in args.sides}
        for repeat in range(args.repeats):
            for clients in args.concurrency:
                for side, (_, url) in servers.items():
                    with CpuByProcess() if args.cpu_by_process else contextlib.nullcontext() as cpu:
                        result = asyncio.run(load(url, model[side], clients, max(8, 2 * clients), args.max_tokens))
                    runs[side][clients].append(result)
                    print(f"  repeat {repeat + 1}: {side} at {clients} clients: {result}", file=sys.stderr, flush=True)
                    if cpu is not None:
                        print(cpu.table(), file=sys.stderr, flush=True)
    finally:
        for server, _ in servers.values():
            server.kill()
            server.wait()
    table = {
        side: {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in levels.items()}
        for side, levels in runs.items()
    }
    base = table.get("transformers")
    where = f"{args.model} ({args.precision}) on {'a GPU' if args.gpu else f'{os.cpu_count()} CPUs'}"
    where += f", with {' '.join(args.set)}" if args.set else ""
    print(f"\n{where}, max_tokens {args.max_tokens}, guard {'on' if guard else 'off'}, medians of {args.repeats}\n")
    print(
        f"{'side':<14}{'clients':>8}{'tokens/s':>10}{'x transf.':>10}{'p50 s':>8}{'p99 s':>8}{'TTFT p50 s':>12}"
        f"{'shed':>6}"
    )
    for side, levels in table.items():
        for clients, r in levels.items():
            ratio = f"{r['tokens_per_s'] / base[clients]['tokens_per_s']:.2f}" if base else "-"
            print(
                f"{side:<14}{clients:>8}{r['tokens_per_s']:>10.1f}{ratio:>10}{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}"
                f"{r['ttft_p50_s']:>12.3f}{r['shed']:>6.0f}"
            )
    if "vllm" in table and "serve-llm" in table:
        one = min(args.concurrency)
        extra = 1000 * (table["vllm"][one]["ttft_p50_s"] - table["serve-llm"][one]["ttft_p50_s"])
        print(f"\ningress + guard + router over Ray Serve LLM alone, p50 TTFT at {one} client(s): {extra:+.1f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps({"setup": where, "guard": guard, "table": table}, indent=2))


if __name__ == "__main__":
    main()
