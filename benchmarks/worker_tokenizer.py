"""What a worker that only tokenises pays to load its tokenizer: through AutoTokenizer, or through the class the
driver's AutoTokenizer chose (`models.load_tokenizer(..., tokenizer_class=...)`, what prepare's tokenize workers
and the serving ingress do now).

    .venv/bin/python benchmarks/worker_tokenizer.py [--repeats 5] [--prepare-repeats 3]

Two tables, the variants alternating within each repeat so that other load hits them alike:

1. A fresh interpreter loading the bundled SmolLM2-135M-Instruct tokenizer: seconds from start to loaded
   (imports included) and the process's peak RSS.
2. The quickstart's prepare stage (500 generated rows, tokenised on Ray Data) on a fresh 2-CPU local Ray, each
   run in a new process: the stage's seconds, new worker processes included. The baseline hands its workers no
   class (`tokenizer_class_path` answering None), so they load through AutoTokenizer as before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _harness import alternating, median_table  # noqa: E402

VARIANTS = ("AutoTokenizer", "class from the driver")

LOAD = """
import json, sys, time
began = time.perf_counter()
from raytune_app import models
path = models.resolve("bundled:smollm2-135m-instruct")
models.load_tokenizer(path, tokenizer_class=sys.argv[1] or None)
print(json.dumps({"seconds": time.perf_counter() - began,
                  # VmHWM, not ru_maxrss: that one keeps the parent's peak across fork + exec
                  "rss_mib": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024,
                  "torch": "torch" in sys.modules}))
"""

PREPARE = """
import json, sys, time
sys.path.insert(0, sys.argv[3])
from _harness import start_ray
from raytune_app import config, models
from raytune_app.data.prepare import prepare
if sys.argv[1] == "AutoTokenizer":
    models.tokenizer_class_path = lambda tokenizer: None  # the baseline: workers load through AutoTokenizer
recipe = config.load(sys.argv[2], [f"run.output_dir={sys.argv[4]}"])
start_ray(num_cpus=2)
began = time.perf_counter()
prepare(recipe, force=True)
print(json.dumps({"seconds": time.perf_counter() - began}))
"""


def _child(script: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prepare-repeats", type=int, default=3)
    args = parser.parse_args()
    from raytune_app import models

    cls = models.tokenizer_class_path(models.load_tokenizer(models.resolve("bundled:smollm2-135m-instruct")))
    assert cls, "the bundled tokenizer's class is transformers' own"
    loads = alternating(
        VARIANTS, args.repeats, lambda variant: _child(LOAD, "" if variant == VARIANTS[0] else cls), show=str
    )
    base = statistics.median(r["seconds"] for r in loads[VARIANTS[0]])
    print(f"\nbundled SmolLM2 tokenizer in a fresh interpreter, medians of {args.repeats}:")
    print(f"{'variant':<24}{'seconds':>9}{'ratio':>7}{'peak MiB':>10}  torch imported")
    for variant in VARIANTS:
        rows = loads[variant]
        seconds = statistics.median(r["seconds"] for r in rows)
        rss = statistics.median(r["rss_mib"] for r in rows)
        print(f"{variant:<24}{seconds:>9.2f}{seconds / base:>7.2f}{rss:>10.0f}  {rows[0]['torch']}")
    if args.prepare_repeats:
        prepares = alternating(VARIANTS, args.prepare_repeats, _prepare_once)
        title = f"\nquickstart prepare (500 rows) on a fresh 2-CPU Ray, medians of {args.prepare_repeats}:"
        print(median_table(title, prepares))


def _prepare_once(variant: str) -> float:
    """Seconds of one quickstart prepare on a fresh Ray in a new process, its workers loading as `variant` does."""
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "quickstart.yaml")
    with tempfile.TemporaryDirectory(prefix="worker-tokenizer-") as out:
        return _child(PREPARE, variant, recipe, HERE, out)["seconds"]


if __name__ == "__main__":
    main()
