"""Prepare-stage throughput: our Ray Data pipeline vs a single-process `datasets.Dataset.map` baseline.

    .venv/bin/python benchmarks/prepare_throughput.py --rows 200000 --repeats 3

Both sides do the same work on the same file with the same tokenizer (the bundled SmolLM2): parse
JSONL, validate and normalise each row (raytune_app.data.rows), drop exact duplicates, assign the
hash split, render the chat template and tokenise with the assistant mask
(raytune_app.data.tokenize), and write Parquet per split. The input is the quickstart extraction
task with 3% malformed rows and 5% duplicates mixed in.

Each run happens in a fresh subprocess; its peak memory is the largest total RSS of that process
and all its descendants (for Ray: driver, raylet, GCS and workers), sampled every 0.2 s. Ray's
start-up is outside the timed part and reported separately. Prints a table of medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import run_measured, start_ray  # noqa: E402

MODEL = "bundled:smollm2-135m-instruct"
SYSTEM = "Extract the order details from the customer's message as JSON."


def make_input(path: Path, rows: int) -> None:
    from raytune_app.data import extraction

    rng = random.Random(0)
    base = extraction.generate(min(rows, 50_000), seed=0)
    with path.open("w") as out:
        for i in range(rows):
            roll = rng.random()
            if roll < 0.03:
                out.write('{"message": "broken row", "extraction": \n')
            elif roll < 0.08 and i > 0:
                out.write(json.dumps(base[rng.randrange(min(i, len(base)))]) + "\n")
            else:
                row = dict(base[i % len(base)])
                row["message"] += f" (ref {i})"  # keep rows beyond the base set unique
                out.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------- the two sides


def run_ray(source: str, out: str) -> dict:
    import ray

    from raytune_app import config
    from raytune_app.data.prepare import prepare

    started = time.time()

    start_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    startup = time.time() - started
    recipe = config.validate(
        {
            "run": {"name": "bench", "output_dir": out},
            "model": {"path": MODEL},
            "data": {
                "sources": [source],
                "columns": {"prompt": "message", "response": "extraction"},
                "system_prompt": SYSTEM,
                "max_seq_length": 1024,
            },
        }
    )
    started = time.time()
    manifest = prepare(recipe, force=True)
    seconds = time.time() - started
    ray.shutdown()
    return {"seconds": seconds, "startup": startup, "rows_out": sum(manifest["rows_out"].values())}


def run_datasets(source: str, out: str) -> dict:
    import datasets

    from raytune_app.data import rows as rowlib
    from raytune_app.data.tokenize import tokenize_examples
    from raytune_app.models import load_tokenizer

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(MODEL)
    spec = rowlib.RowSpec(kind="prompt_response", prompt="message", response="extraction", system_prompt=SYSTEM)
    started = time.time()
    # Read lines as text so a malformed row is a rejection, not a crash (the same contract as ours).
    ds = datasets.load_dataset("text", data_files=source, split="train", cache_dir=os.path.join(out, "hf-cache"))

    def process(batch):
        result = {"status": [], "content_hash": [], "split": [], "input_ids": [], "completion_mask": []}
        examples, ok = [], []
        for line in batch["text"]:
            try:
                example = rowlib.to_example(rowlib.parse_json_line(line), spec)
                examples.append(example)
                ok.append(True)
            except rowlib.RowProblem:
                examples.append(None)
                ok.append(False)
        tokenized = iter(tokenize_examples(tokenizer, [e["messages"] for e in examples if e], 1024, "drop"))
        for example in examples:
            if example is None:
                result["status"].append("rejected")
                for key in ("content_hash", "split", "input_ids", "completion_mask"):
                    result[key].append(None)
                continue
            ids, mask, problem = next(tokenized)
            result["status"].append("ok" if problem is None else problem.reason)
            result["content_hash"].append(rowlib.content_hash(example))
            result["split"].append(rowlib.assign_split(rowlib.split_key(example), 0.1, 0.1))
            result["input_ids"].append(ids)
            result["completion_mask"].append(mask)
        return result

    ds = ds.map(process, batched=True, batch_size=1024, remove_columns=["text"])
    seen: set[str] = set()

    def first_copy(row):
        if row["status"] != "ok" or row["content_hash"] in seen:
            return False
        seen.add(row["content_hash"])
        return True

    ds = ds.filter(first_copy)
    rows_out = 0
    for split in ("train", "val", "test"):
        part = ds.filter(lambda row, split=split: row["split"] == split)
        part.to_parquet(os.path.join(out, f"{split}.parquet"))
        rows_out += len(part)
    return {"seconds": time.time() - started, "startup": 0.0, "rows_out": rows_out}


# ----------------------------------------------------------------------------------------- harness


def measure(side: str, source: str) -> dict:
    """Run one side in a fresh subprocess; returns its result plus the peak RSS of its process tree."""
    with tempfile.TemporaryDirectory() as out:
        return run_measured(__file__, [side, source, out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, source, out = args.child
        result = run_ray(source, out) if side == "ray" else run_datasets(source, out)
        print(json.dumps(result))
        return

    from raytune_app.models import resolve

    resolve(MODEL)  # convert the bundled model once, outside every timed run
    print(
        f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; python "
        f"{sys.version.split()[0]}"
    )
    print(
        f"{'rows':>8} {'pipeline':<22} {'rows/s':>9} {'peak GiB':>9} {'ratio':>6}   (median of {args.repeats}; "
        f"per-run rows/s)"
    )
    with tempfile.TemporaryDirectory() as work:
        for rows in args.rows:
            source = Path(work) / f"input-{rows}.jsonl"
            make_input(source, rows)
            results = {side: [measure(side, str(source)) for _ in range(args.repeats)] for side in ("datasets", "ray")}
            speed = {side: statistics.median(rows / r["seconds"] for r in runs) for side, runs in results.items()}
            for side, label in (("datasets", "datasets.map (1 proc)"), ("ray", "Ray Data (ours)")):
                runs = results[side]
                peak = statistics.median(r["peak_gib"] for r in runs)
                per_run = ", ".join(f"{rows / r['seconds']:.0f}" for r in runs)
                ratio = speed[side] / speed["datasets"]
                print(
                    f"{rows:>8} {label:<22} {speed[side]:>9.0f} {peak:>9.2f} {ratio:>5.2f}x   [{per_run}]"
                    + (f"  ray start-up {statistics.median(r['startup'] for r in runs):.1f}s" if side == "ray" else "")
                )
            outs = {side: {r["rows_out"] for r in runs} for side, runs in results.items()}
            print(f"{'':>8} rows out: datasets {sorted(outs['datasets'])}, ray {sorted(outs['ray'])}")


if __name__ == "__main__":
    main()
