"""Teacher throughput: the distill stage's Ray Data actor pool (2 replicas) vs one sequential loop.

    .venv/bin/python benchmarks/teacher_throughput.py [--inputs 16] [--max-new-tokens 48] [--repeats 3]

Same teacher (the bundled SmolLM2-135M-Instruct, `hf` backend), same inputs (multi-step arithmetic
problems with the dss recipe's prompt), greedy, the same `max_new_tokens`:
  (a) sequential: one process asks the teacher one input at a time (what a script over an API does);
  (b) ray data:   the hf teacher of `distill.teachers.teach`: an actor pool of 2 replicas (1 thread each), batches of 8.
Examples/s counts the teacher work only (model loading excluded on both sides); each run is a fresh
subprocess; the table shows medians and the ratio to (a).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import run_measured, start_ray  # noqa: E402


def _requests(n: int):
    from raytune_app import config
    from raytune_app.data import arithmetic
    from raytune_app.distill.run import _teacher_prompt

    recipe = config.load(ROOT / "recipes" / "dss.yaml")
    rows = arithmetic.generate(n, seed=11)
    return recipe, [
        {"key": str(i), "input": r["question"], "sample": 0, "prompt": _teacher_prompt(recipe, r["question"])}
        for i, r in enumerate(rows)
    ]


def child(side: str, n: int, max_new_tokens: int) -> dict:
    import pyarrow as pa

    _, requests = _requests(n)
    if side == "sequential":
        from raytune_app.evaluate.generation import Generator

        generator = Generator({"path": "bundled:smollm2-135m-instruct"}, None, max_new_tokens)
        began = time.perf_counter()
        texts = [generator(pa.Table.from_pylist([r]))["prediction"][0].as_py() for r in requests]
        seconds = time.perf_counter() - began
    else:
        import ray

        from raytune_app.evaluate.generation import Generator

        start_ray()
        # The distill stage's hf teacher (teachers.teach): Generator replicas on an actor pool. Timed from the
        # first batch's start to the last batch's end, so model loading is left out as on side (a).
        ds = ray.data.from_items(requests).map_batches(
            Generator,
            fn_constructor_kwargs={
                "model": {"path": "bundled:smollm2-135m-instruct"},
                "weights": None,
                "max_new_tokens": max_new_tokens,
                "threads": 1,
            },
            compute=ray.data.ActorPoolStrategy(size=2),
            batch_size=8,
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        rows = sorted(ds.take_all(), key=lambda r: int(r["key"]))
        seconds = max(r["batch_end"] for r in rows) - min(r["batch_start"] for r in rows)
        texts = [r["prediction"] for r in rows]
    return {"examples_per_s": n / seconds, "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    sides = {}
    for side in ("sequential", "ray_data_pool_2"):
        runs = [run_measured(__file__, [side, str(args.inputs), str(args.max_new_tokens)]) for _ in range(args.repeats)]
        sides[side] = runs
    base = statistics.median(r["examples_per_s"] for r in sides["sequential"])
    same = sum(a == b for a, b in zip(sides["sequential"][0]["texts"], sides["ray_data_pool_2"][0]["texts"]))
    print(
        f"\nhf teacher SmolLM2-135M-Instruct, {args.inputs} inputs, max_new_tokens {args.max_new_tokens}, "
        f"{os.cpu_count()} CPUs, medians of {args.repeats}\n"
    )
    print(f"{'side':<20}{'examples/s':>12}{'x sequential':>14}{'peak GiB':>10}")
    for side, runs in sides.items():
        rate = statistics.median(r["examples_per_s"] for r in runs)
        print(f"{side:<20}{rate:>12.3f}{rate / base:>14.2f}{statistics.median(r['peak_gib'] for r in runs):>10.2f}")
    print(f"identical teacher texts: {same}/{args.inputs}")


if __name__ == "__main__":
    main()
