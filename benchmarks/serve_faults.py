"""Serving under overload and faults: load held, admitted vs shed, p99 of admitted requests at 1x, 2x and
10x capacity, the time to recover after the LLM replica is killed, and the guard's cost on a 2,000-token
conversation.

    .venv/bin/python benchmarks/serve_faults.py [--model bundled|tiny] [--duration 20] [--max-tokens 16]

The server is a separate process (`--serve`): the quickstart recipe's Serve app on the bare base model
(SmolLM2-135M-Instruct; `--model tiny`: a tiny random Llama, to see the serving machinery alone) on vLLM
(`--backend transformers`: the other engine), one LLM replica with `max_batch_size` 4, so capacity is
max_ongoing_requests (2 x 4 = 8) and the queue per caller another 8; no backup (a kill is then visible),
the guard off (its cost is measured on its own, below) unless `--guard FOLDER` puts a trained guard in
front (enforce mode). This process is the load (aiohttp's client; `--client httpx` as measured before
session 13): at each level, `level x capacity` clients send chat
requests back to back for `--duration` seconds; a 200 is admitted, a 429 / 503 shed ("proxy": of those, the ones
Serve's proxy refused for the ingress, before our code read them), and a shed client waits the
Retry-After it was given before it tries again (as the OpenAI client does). The baseline is the 1x level
of the same run: the table gives p99 of admitted requests against it. "shed p99" is what the clients saw;
"in server" the p99 of the same refusals as Serve's proxy timed them (its access log), without the load
generator's event loop and the kernel queues in front of the proxy, which share the two cores too.

Recovery: at 1x load the server kills its LLM replica (ray.kill, as a crashed process); the time until a
request is answered again, and until a whole second passes with no failure.

Guard: the guard's windows over a 2,000-token conversation (a long system prompt and 12 turns), scored in
this process at one torch thread as a guard replica runs: a new conversation (nothing cached), the same
conversation's next turn (the history's windows cached, as a replica has them from the previous turn),
and the old single truncated window as the baseline; the
guard is the one `raytune-app guard train` made (runs/guard) or, without one, the bundled MiniLM with an
untrained head (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Where is my parcel? Ordered three notebooks last week, order B-77.",
    "Hi, I want to cancel order 5521 for one desk lamp, it is no longer needed.",
    "Please change the delivery date of order 3141 to 2026-12-02.",
    "Is the green kettle back in stock? I would order two.",
]
BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_forever(
    port: int, model: str, out: str, backend: str, guard: str | None = None, extra: list[str] | None = None
) -> None:
    """The server side: start the app, print READY, then obey `kill llm` lines on stdin; `extra`: recipe
    overrides after the benchmark's own (`--set`)."""
    import ray

    from raytune_app import config
    from raytune_app.serve.app import run

    path = "bundled:smollm2-135m-instruct"
    if model == "tiny":
        from raytune_app.tiny import build_tiny_llama

        path = build_tiny_llama(Path(out) / "tiny")
    overrides = [
        f"run.output_dir={out}",
        f"model.path={path}",
        f"serve.port={port}",
        "serve.champion=base",
        "serve.backup=null",
        *([f"serve.guard.model={guard}", "serve.guard.mode=enforce"] if guard else ["serve.guard.mode='off'"]),
        f"serve.backend={backend}",
        f"serve.batching.max_batch_size={BATCH}",  # the transformers engine's batch
        f"serve.vllm.max_num_seqs={BATCH}",  # vLLM's: either way capacity is 2 x BATCH (serve/app.py)
        "serve.batching.batch_wait_timeout_s=0.05",
        "serve.limits.timeout_s=60",
        *(extra or []),
    ]
    recipe = config.load(ROOT / "recipes" / "quickstart.yaml", overrides)
    from _harness import start_ray

    start_ray()
    run(recipe)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "kill llm":
            name = next(
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{recipe.run.name}#llm#")
            )
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            print(f"KILLED {time.time()}", flush=True)


@contextlib.asynccontextmanager
async def http_poster(library: str, connections: int):
    """(post(url, body) -> (status, retry-after, text), the library's transport errors) over one pooled client:
    aiohttp, or httpx (as the entries before session 13 were measured). On two shared cores the load's own CPU
    shows in what the clients time: with aiohttp the proxy's refusals reached them in 0.14-0.27 s at p99 vs
    0.70-0.97 s with httpx, and more requests were admitted (BENCHMARKS.md)."""
    if library == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

            async def post(url, body):
                async with session.post(url, json=body) as r:
                    return r.status, r.headers.get("retry-after"), await r.text()

            yield post, (aiohttp.ClientError, asyncio.TimeoutError)
    else:
        import httpx

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:

            async def post(url, body):
                r = await http.post(url, json=body)
                return r.status_code, r.headers.get("retry-after"), r.text

            yield post, httpx.HTTPError


async def hold(
    url: str, clients: int, duration: float, max_tokens: int, done=None, library: str = "aiohttp"
) -> list[dict]:
    """`clients` closed-loop clients for `duration` seconds, or until `done(records)` says so; one record
    per answer."""
    records, end = [], time.time() + duration

    async def client(post, errors, index):
        i = 0
        while time.time() < end and not (done and done(records)):
            i += 1
            began = time.time()
            body = {
                "model": "quickstart",
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[(index + i) % len(PROMPTS)]}],
            }
            wait, proxy = 0.0, False
            try:
                status, retry_after, text = await post(url + "/v1/chat/completions", body)
                wait = float(retry_after or 0)
                # Serve's proxy refusing for the ingress (its slots and queue full) answers in plain text.
                proxy = status in (429, 503) and text.startswith("Request dropped due to backpressure")
            except errors as exc:
                status = type(exc).__name__
            records.append({"start": began, "end": time.time(), "status": status, "proxy": proxy})
            if status in (429, 503):
                await asyncio.sleep(max(wait, 0.05))  # as the OpenAI client does: it waits Retry-After, then retries

    async with http_poster(library, clients + 8) as (post, errors):
        await asyncio.gather(*(client(post, errors, i) for i in range(clients)))
    return records


def pct(values: list[float], q: float) -> float:
    """The q-quantile of sorted values (nan when there are none)."""
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summarise(records: list[dict], duration: float) -> dict:
    admitted = sorted(r["end"] - r["start"] for r in records if r["status"] == 200)
    shed = sorted(r["end"] - r["start"] for r in records if r["status"] in (429, 503))
    other = [r["status"] for r in records if r["status"] not in (200, 429, 503)]

    return {
        "admitted": len(admitted),
        "shed": len(shed),
        "by_proxy": sum(1 for r in records if r.get("proxy")),
        "other": other,
        "admitted_per_s": len(admitted) / duration,
        "p50": pct(admitted, 0.5),
        "p99": pct(admitted, 0.99),
        "shed_p99": pct(shed, 0.99),
        "proxy_p99": pct(sorted(r["end"] - r["start"] for r in records if r.get("proxy")), 0.99),
    }


def refusals_at_the_server(began: float, ended: float) -> list[float]:
    """How long Serve's proxy took over each 429 it answered between `began` and `ended` (seconds), from its
    access log (`POST /v1/chat/completions 429 7.9ms`): the refusal's time inside the server, without the
    load generator's own event loop and the kernel's queues in front of the proxy."""
    import datetime
    import glob
    import re

    line_re = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* POST /v1/chat/completions 429 ([\d.]+)ms")
    seconds = []
    for path in glob.glob("/tmp/ray/session_latest/logs/serve/proxy_*.log"):
        for line in open(path, errors="replace"):
            match = line_re.match(line)
            if match:
                at = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if began <= at <= ended:
                    seconds.append(float(match.group(2)) / 1000)
    return sorted(seconds)


def recovery(server, url: str, clients: int, max_tokens: int, within_s: float, library: str) -> dict:
    """Kill the LLM replica under `clients` of load: time to the first answer after it, and to a clean second.
    The load goes on until 10 s after the first answer that was sent after the kill, or `within_s`."""
    killed_at: list[float] = []

    def recovered(records: list[dict]) -> bool:
        if not killed_at:
            return False
        ok = [r["end"] for r in records if r["status"] == 200 and r["start"] > killed_at[0]]
        return bool(ok) and time.time() > min(ok) + 10

    async def run():
        task = asyncio.ensure_future(hold(url, clients, within_s, max_tokens, done=recovered, library=library))
        await asyncio.sleep(10)
        server.stdin.write("kill llm\n")
        server.stdin.flush()
        line = await asyncio.get_running_loop().run_in_executor(None, server.stdout.readline)
        killed_at.append(float(line.split()[1]))
        return killed_at[0], await task

    killed, records = asyncio.run(run())
    after = sorted((r for r in records if r["end"] > killed), key=lambda r: r["end"])
    first_ok = next((r["end"] for r in after if r["status"] == 200 and r["start"] > killed), None)
    failures = [r for r in after if r["status"] != 200]
    clean_from = max((r["end"] for r in failures), default=killed)
    return {
        "first_answer_s": None if first_ok is None else first_ok - killed,
        "last_failure_s": clean_from - killed,
        "failed": len(failures),
        "failed_statuses": sorted({str(r["status"]) for r in failures}),
    }


def guard_cost(repeats: int) -> dict:
    """Windows over a 2,000-token conversation vs the old single truncated window, one torch thread."""
    import json
    import tempfile

    import torch

    from raytune_app import models
    from raytune_app.guard.model import Guard, WindowCache

    torch.set_num_threads(1)
    trained = ROOT / "runs" / "guard"
    folder = str(trained) if (trained / "guard.json").exists() else None
    if folder is None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = tempfile.mkdtemp(prefix="guard-speed-")
        base = models.resolve("bundled:all-minilm-l6-v2")
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).save_pretrained(f"{folder}/model")
        AutoTokenizer.from_pretrained(base).save_pretrained(f"{folder}/model")
        Path(folder, "guard.json").write_text(json.dumps({"threshold": 0.5, "max_length": 128, "inference": "int8"}))
    guard = Guard.load(folder, threads=1)
    topics = ["orders", "deliveries", "returns", "refunds", "gift cards", "warranty claims", "invoices", "stock"]
    rules = [
        f"Rule {i}: for {topics[i % len(topics)]} in region {i % 7}, answer politely, cite the order number, and "
        f"offer the {['tracking link', 'return label', 'discount code', 'invoice copy'][i % 4]} when asked."
        for i in range(64)
    ]
    system = " ".join(rules)
    turns = [f"{PROMPTS[i % 4]} Also, order {1000 + i} arrived with a scratch on the lid." for i in range(12)]

    def conversation(n_turns: int) -> list[str]:
        return list(reversed([system] + turns[:n_turns]))  # the guard reads the newest message first

    count = lambda texts: sum(len(guard.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)  # noqa: E731
    full = conversation(12)
    tokens, windows = count(full), len(guard.windows(full)[0])
    guard.score_segments(full)  # warm-up
    warm = WindowCache()
    guard.score_segments(conversation(11), cache=warm)  # the conversation so far, read on the previous turn
    joined = "\n".join(reversed(full))
    sides = {
        "windows, new conversation": lambda: guard.score_segments(full, cache=WindowCache()),
        "windows, its next turn": lambda: guard.score_segments(full, cache=warm),
        "one truncated window (old)": lambda: guard.scores([joined]),
    }
    out = {}
    for name, call in sides.items():
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            call()
            times.append((time.perf_counter() - began) * 1000)
        times.sort()
        out[name] = {"p50": statistics.median(times), "p99": times[min(len(times) - 1, int(0.99 * len(times)))]}
    return {"tokens": tokens, "windows": windows, "trained": folder == str(trained), "sides": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bundled", "tiny"], default="bundled")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--levels", type=float, nargs="+", default=[1, 2, 10])
    parser.add_argument("--guard-repeats", type=int, default=30)
    parser.add_argument(
        "--backend",
        choices=["vllm", "transformers"],
        default="vllm",
        help="the LLM replica's engine (vllm: the quickstart recipe's; its max_num_seqs is set to the batch size)",
    )
    parser.add_argument("--recovery-s", type=float, default=600.0, help="how long to wait for the restarted replica")
    parser.add_argument(
        "--guard",
        help="a trained guard folder (guard.json) in front of the model, enforce mode; default: no guard",
    )
    parser.add_argument("--skip-serving", action="store_true", help="only the guard measurement")
    parser.add_argument("--skip-kill", action="store_true", help="no replica kill (the load levels only)")
    parser.add_argument(
        "--client",
        choices=["aiohttp", "httpx"],
        default="aiohttp",
        help="the load generator's HTTP library (httpx: as the entries before session 13 were measured)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for the server, after the benchmark's own (repeatable), e.g. to try a queue size: "
        "--set serve.deployments.ingress.max_queued_requests=4",
    )
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_forever(int(args.serve[0]), args.serve[1], args.serve[2], args.backend, args.guard, args.set)
        return
    import tempfile

    capacity = 2 * BATCH  # one LLM replica x max_ongoing_requests (serve/app.py: 2 x max_batch_size)
    if not args.skip_serving:
        port, out = _free_port(), tempfile.mkdtemp(prefix="serve-faults-")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), args.model, out, "--backend", args.backend]
            + (["--guard", str(Path(args.guard).resolve())] if args.guard else [])
            + [f"--set={override}" for override in args.set],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        for line in server.stdout:
            if line.strip() == "READY":
                break
        else:
            raise RuntimeError("the server exited before it was ready")
        try:
            asyncio.run(hold(url, 2, 5, args.max_tokens, library=args.client))  # warm-up
            levels = {}
            for level in args.levels:
                clients = int(level * capacity)
                began = time.time()
                records = asyncio.run(hold(url, clients, args.duration, args.max_tokens, library=args.client))
                inside = refusals_at_the_server(began, time.time() + 1)
                levels[level] = summarise(records, args.duration) | {
                    "clients": clients,
                    "server_shed_p99": pct(inside, 0.99),
                }
                print(f"  {level}x: {levels[level]}", file=sys.stderr, flush=True)
            kill = (
                None
                if args.skip_kill
                else recovery(server, url, capacity, args.max_tokens, args.recovery_s, args.client)
            )
        finally:
            server.kill()
            server.wait()
        base = levels[args.levels[0]]
        print(
            f"\n{args.model} model on {args.backend}, {os.cpu_count()} CPUs, capacity {capacity} "
            f"(1 LLM replica x max_ongoing {capacity}; queue {capacity} more), max_tokens {args.max_tokens}, "
            f"{args.duration:.0f} s per level, guard: {args.guard or 'off'}"
            + "".join(f", {override}" for override in args.set)
            + "\n"
        )
        head = f"{'load':>6}{'clients':>8}{'admitted':>9}{'shed':>6}{'proxy':>6}{'other':>6}{'adm/s':>7}"
        print(head + f"{'p50 s':>7}{'p99 s':>7}{'p99 x1':>7}{'shed p99 s':>11}{'proxy p99 s':>12}{'in server':>10}")
        for level, r in levels.items():
            print(
                f"{level:>5g}x{r['clients']:>8}{r['admitted']:>9}{r['shed']:>6}{r['by_proxy']:>6}{len(r['other']):>6}"
                f"{r['admitted_per_s']:>7.2f}{r['p50']:>7.2f}{r['p99']:>7.2f}{r['p99'] / base['p99']:>7.2f}"
                f"{r['shed_p99']:>11.3f}{r['proxy_p99']:>12.3f}{r['server_shed_p99']:>10.3f}"
            )
        if kill is not None:
            first = kill["first_answer_s"]
            answered = (
                f"first answer after {first:.1f} s" if first is not None else f"none within {args.recovery_s:.0f} s"
            )
            print(
                f"\nLLM replica killed at 1x load: {answered}"
                f", last failure {kill['last_failure_s']:.1f} s after the kill; {kill['failed']} requests failed "
                f"({', '.join(kill['failed_statuses']) or 'none'})"
            )
    cost = guard_cost(args.guard_repeats)
    which = "the trained guard" if cost["trained"] else "MiniLM, untrained head"
    print(f"\nguard ({which}, int8, 1 thread) on a {cost['tokens']}-token conversation, {cost['windows']} windows:")
    for name, r in cost["sides"].items():
        print(f"  {name:<28} p50 {r['p50']:7.1f} ms   p99 {r['p99']:7.1f} ms")
    old = cost["sides"]["one truncated window (old)"]
    for name in ("windows, new conversation", "windows, its next turn"):
        new = cost["sides"][name]
        print(f"  {name} / old: p50 x{new['p50'] / old['p50']:.1f}, p99 x{new['p99'] / old['p99']:.1f}")


if __name__ == "__main__":
    main()
