"""How long the serving app takes to start on the vLLM backend (what a first deploy, a scale-up and every replica
restart after a crash wait for), with and without Ray Serve LLM's per-node model download step.

    .venv/bin/python benchmarks/vllm_replica_start.py [--repeats 3]

Each start is `raytune_app.serve.app.run` of a small app on the bundled SmolLM2-135M-Instruct (a local folder):
the vLLM `llm` deployment behind our ingress and router, no guard, no backup, enforce_eager, timed until Serve
reports it running; then the app and Serve are shut down. Two variants alternate within each repeat, so other
load hits them alike:

- `per-node download` (the baseline): LLMConfig's default callback, so Ray Serve LLM runs its download task
  on the engine's node before starting the engine; for a local folder it downloads nothing, but the task runs
  in a new worker process that imports torch and transformers first.
- `local folder` (what serving does now, raytune_app/serve/vllm_server.py `LocalModelStart`): the step skipped.

The table gives the median seconds to start and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _harness import alternating, median_table, start_ray  # noqa: E402

VARIANTS = ("per-node download", "local folder")


def _recipe(port: int, output_dir: str):
    from raytune_app import config

    return config.validate(
        {
            "run": {"name": "start", "output_dir": output_dir},
            "model": {"path": "bundled:smollm2-135m-instruct"},
            "data": {"generator": {"name": "order_extraction"}},  # never read: a recipe names its data
            "serve": {
                "port": port,
                "backend": "vllm",
                "backup": None,
                "guard": {"mode": "off"},
                "access": {"api_keys_env": None},
                "vllm": {"enforce_eager": True, "max_model_len": 1024, "kv_cache_gb": 1},
                "deployments": {name: {"num_cpus": 0.25} for name in ("ingress", "router")} | {"llm": {"num_cpus": 1}},
            },
        }
    )


def start_once(variant: str, port: int, output_dir: str) -> float:
    """Seconds from `run` to a running app, for one variant; the app and Serve are shut down after."""
    from ray import serve
    from ray.llm._internal.common.callbacks.base import CallbackConfig

    from raytune_app.serve import app, vllm_server

    built = vllm_server.llm_config
    if variant == "per-node download":  # the baseline: LLMConfig's default callback, Ray's download step kept

        def baseline(spec, options):
            config = built(spec, options)
            config.callback_config = CallbackConfig()
            return config

        vllm_server.llm_config = baseline
    try:
        began = time.perf_counter()
        app.run(_recipe(port, output_dir))
        return time.perf_counter() - began
    finally:
        vllm_server.llm_config = built
        serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=8470)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start_ray(num_cpus=2)
    output_dir = tempfile.mkdtemp(prefix="vllm-replica-start-")
    times = alternating(VARIANTS, args.repeats, lambda variant: start_once(variant, args.port, output_dir))
    title = f"\nvLLM app start, bundled SmolLM2-135M (local folder), 2 CPUs, medians of {args.repeats}:"
    print(median_table(title, times, column="start s"))


if __name__ == "__main__":
    main()
