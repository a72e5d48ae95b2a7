"""The vLLM serving backend: Ray Serve LLM's `LLMServer` (vLLM's engine, its scheduler and continuous
batching, LoRA slots, structured outputs) as the `llm` / `backup` deployment behind our router.

    app.py:  build_deployment(spec, options)   # ray.serve.llm.build_llm_deployment(LLMConfig, VLLMServer)

`VLLMServer` is Ray Serve LLM's LLMServer with the four methods the router calls on any LLM deployment
(the transformers backend, raytune_app/serve/llm.py, has the same ones):

    stream(payload)      events of one request: {"delta", "logprobs"} as tokens arrive, then one final
                         {"delta": "", "finish_reason", "prompt_tokens", "completion_tokens", "prompt_ids",
                          "completion_ids"}
    generate(payload)    the same gathered into one reply (text, logprobs, counts, ids)
    divergence(prompt_ids, reply_ids, reference, candidate)   drift: top-k KL along a served reply
    info()               what /v1/stats shows for this replica

Everything else is LLMServer's own: starting the engine, `check_health` (Serve restarts a replica whose
engine died), LoRA loading through Serve model multiplexing, metrics. A payload becomes vLLM's own OpenAI
request (ChatCompletionRequest / CompletionRequest) handed to the engine LLMServer started, so sampling,
stop strings, seeds, logprobs and `response_format` mean exactly what vLLM's OpenAI server means by them,
and vLLM's scheduler batches requests as it does there. Cancellation: when the router drops a stream
(the client went away), Serve cancels `stream`; the cancellation reaches vLLM's generator and vLLM aborts
the request (tests/test_vllm_serve.py checks the engine has nothing left running).

LoRA adapters: the payload's adapter key (champion, challenger, adapter<i>) is the Serve multiplexed model
id and the LoRA name vLLM knows. LLMServer's own downloader takes only s3 / gs / azure folders, so
`AdapterLoader` stands in for it (LLMServer's `model_downloader` argument): a registry version is
downloaded once, an s3:// folder is fetched, a local folder is used as it is, and an adapter whose rank
is above the engine's max_lora_rank is refused with HTTP 400 while the replica serves on. vLLM keeps
`max_loaded_adapters` adapters (max_loras / max_cpu_loras) and reloads an evicted one from its folder; on a
CPU it keeps every adapter of the app and one spare slot (vllm_stream.lora_slots says why).

A model in a local folder (the bundled model, a merged export), unsharded, starts without Ray Serve LLM's
per-node download step (`LocalModelStart`): for a folder that step downloads nothing, but it runs as a Ray task in a new
worker process that imports torch and transformers first, 25 s of every replica start on 2 cores.

Ray 2.60 internals used (pinned by pyproject's ray==2.60.*): LLMServer's `model_downloader` and `engine_cls`
arguments, its `engine` and multiplexed `_load_model`, `DiskMultiplexConfig`, VLLMEngine's
`_prepare_engine_config` (serve.vllm.cpu_single_process), and the base class of LLMConfig's (public)
`callback_config`, which 2.60 does not export.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
import uuid

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.llm.deployment import LLMServer

from raytune_app.serve import prompt
from raytune_app.serve.drift import top_k_kl
from raytune_app.serve.engine import BASE
from raytune_app.serve.options import ModelRequestError
from raytune_app.serve.vllm_stream import (
    adapter_rank,
    adapter_targets,
    carries_text,
    chat_logprobs,
    engine_error,
    lora_slots,
    lora_target_modules,
    merge_logprobs,
    sse_data,
)

logger = logging.getLogger("ray.serve")
_LORA_IDS = itertools.count(1)


# --------------------------------------------------------------------------------- building


def engine_kwargs(spec: dict, on_gpu: bool) -> dict:
    """vLLM engine arguments for a serving spec (app.plan's llm / backup entry)."""
    from raytune_app import models

    v, model = spec["vllm"], spec["model"]
    kwargs = {
        "dtype": models.vllm_dtype(spec["precision"], on_gpu),
        "max_num_seqs": v["max_num_seqs"],
        "enforce_eager": v["enforce_eager"],
        "max_logprobs": 20,
        "trust_remote_code": model.get("trust_remote_code", False),
    }
    if model.get("tokenizer"):
        kwargs["tokenizer"] = models.resolve(model["tokenizer"])
    if v["max_model_len"]:
        kwargs["max_model_len"] = v["max_model_len"]
    if spec["adapters"]:
        # On a CPU a slot for every adapter and a spare one, so that base requests batched with adapter
        # requests stay base (lora_slots says why); on a GPU max_loaded_adapters slots.
        n = lora_slots(spec["max_loaded_adapters"] if on_gpu else len(spec["adapters"]), on_gpu)
        kwargs |= {"enable_lora": True, "max_lora_rank": v["max_lora_rank"], "max_loras": n, "max_cpu_loras": n}
        # The decoder's linear layers only: the output head left to vLLM's LoRA wrapper crashes the
        # engine on drift measurements (vllm_stream.lora_target_modules says why).
        kwargs["lora_target_modules"] = served_lora_targets(spec)
    return kwargs | v["engine_kwargs"]


def served_lora_targets(spec: dict) -> list[str]:
    """The modules the engine serves LoRA on: serve.vllm.engine_kwargs' lora_target_modules where given,
    else the decoder's linear layers (vllm_stream.lora_target_modules)."""
    from raytune_app import models

    given = spec["vllm"]["engine_kwargs"].get("lora_target_modules")
    if given:
        return list(given)
    model = spec["model"]
    return list(lora_target_modules(models.resolve(model["path"]), model.get("trust_remote_code", False)))


def stream_interval_ms(spec: dict, on_gpu: bool) -> float:
    """How long a streamed reply's pieces gather (serve.vllm.stream_interval_ms). Unset, by the device: on a CPU
    every piece's hops through router, ingress and proxy take CPU the engine decodes with, and at a few tokens
    per second per stream a short interval sends one token per piece; on a GPU those hops use a CPU that is
    otherwise idle, and Ray Serve LLM's 50 ms keeps the stream smooth."""
    given = spec["vllm"]["stream_interval_ms"]
    if given is not None:
        return given
    return 50.0 if on_gpu else 250.0


def single_process(spec: dict, options: dict) -> bool:
    """Whether the engine runs its model in the engine-core process (serve.vllm.cpu_single_process): on a CPU,
    and only for an unsharded model (tensor / pipeline parallel shards need a worker process each)."""
    v = spec["vllm"]
    shards = v["engine_kwargs"].get("tensor_parallel_size", 1) * v["engine_kwargs"].get("pipeline_parallel_size", 1)
    on_gpu = (options.get("ray_actor_options") or {}).get("num_gpus")
    return v["cpu_single_process"] and not on_gpu and shards == 1


def llm_config(spec: dict, options: dict):
    """The Ray Serve LLM config of one deployment; `options`: app._options (replicas, CPUs, GPUs)."""
    from ray.serve.llm import LLMConfig

    from raytune_app import models

    actor = dict(options.get("ray_actor_options") or {})
    gpus = actor.pop("num_gpus", 0) or 0
    cpus = actor.pop("num_cpus", 1.0)
    # Custom resources (serve.deployments.<name>.resources) go into every bundle: the engine's workers and
    # the replica (which runs in the first bundle) then land on the nodes that declare them.
    custom = actor.pop("resources", None) or {}
    engine = engine_kwargs(spec, bool(gpus))
    # The engine's workers run in the placement group's bundles (one per tensor / pipeline shard); the
    # replica actor (request handling only) shares the first one. The deployment's num_cpus is split
    # between them, so serve.deployments.<llm|backup>.num_cpus means the same for both backends: what
    # the replica takes in all. Its GPU is the bundle's, not the actor's own.
    replica_cpus = min(0.1, cpus / 2)
    actor["num_cpus"] = replica_cpus
    bundle = {"CPU": round(cpus - replica_cpus, 4)} | ({"GPU": 1} if gpus else {}) | custom
    shards = engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1)
    if gpus:
        engine.setdefault("gpu_memory_utilization", spec["vllm"]["gpu_memory_utilization"])
    serve_fields = (
        "num_replicas",
        "autoscaling_config",
        "max_ongoing_requests",
        "max_queued_requests",
        "health_check_period_s",
        "health_check_timeout_s",
    )
    deployment = {k: options[k] for k in serve_fields if k in options}
    if gpus:
        env = {}
    elif single_process(spec, options):
        env = models.vllm_cpu_single_process_env(bundle["CPU"], spec["vllm"]["kv_cache_gb"])
    else:
        env = {"VLLM_CPU_KVCACHE_SPACE": str(spec["vllm"]["kv_cache_gb"])}
    source = models.resolve(spec["model"]["path"])
    return LLMConfig(
        model_loading_config={"model_id": spec["model_id"], "model_source": source},
        engine_kwargs=engine,
        placement_group_config={"bundles": [bundle] * shards, "strategy": "PACK"},
        deployment_config=deployment | {"ray_actor_options": actor},
        lora_config={"max_num_adapters_per_replica": spec["max_loaded_adapters"]} if spec["adapters"] else None,
        runtime_env={"env_vars": env} if env else None,
        log_engine_metrics=True,
        experimental_configs={"stream_batching_interval_ms": stream_interval_ms(spec, bool(gpus))},
        # A hub id, a bucket, or an engine sharded over several bundles (maybe nodes: Ray's step also makes
        # torch's kernel cache folder on each) still goes through Ray's download step.
        callback_config={"callback_class": LocalModelStart} if os.path.isdir(source) and shards == 1 else {},
    )


class LocalModelStart(CallbackBase):
    """Ray Serve LLM's node initialisation for a model in a local folder: no per-node download. For a folder,
    Ray's step only returns the folder (and makes torch's kernel cache folder, made here), after starting a
    worker process to do so."""

    async def on_before_node_init(self) -> None:
        import torch

        os.makedirs(os.path.join(os.path.dirname(torch.hub.get_dir()), "kernels"), exist_ok=True)
        self.ctx.run_init_node = False


def build_deployment(spec: dict, options: dict):
    """The bound deployment (named options["name"]: llm or backup) for serve.run."""
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(
        llm_config(spec, options),
        bind_kwargs={"spec": spec, "single_process": single_process(spec, options)},
        override_serve_options={"name": options["name"]},
        deployment_cls=VLLMServer,
    )


# ---------------------------------------------------------------------------------- adapters


class AdapterLoader:
    """LLMServer's model downloader for our adapter keys (constructed by LLMServer with its timeouts)."""

    def __init__(self, spec: dict, download_timeout_s: float | None = None, max_tries: int = 1):
        self.spec = spec
        self.folders: dict[str, str] = {}

    def _fetch(self, key: str) -> str:
        from raytune_app import storage
        from raytune_app.registry import store

        ref = self.spec["adapters"][key]
        if key not in self.folders:
            local = store.download(self.spec["tracking_uri"], ref) if ref.startswith("models:/") else ref
            self.folders[key] = storage.local_dir(local)
        folder, limit = self.folders[key], self.spec["vllm"]["max_lora_rank"]
        if not os.path.exists(os.path.join(folder, "adapter_config.json")):
            raise FileNotFoundError(f"no LoRA adapter at {ref} (adapter_config.json missing)")
        rank = adapter_rank(folder)
        if rank > limit:
            raise ModelRequestError(
                400,
                f"The adapter behind `{self.spec['labels'].get(key, key)}` has LoRA rank {rank}, above this "
                f"server's max_lora_rank {limit}; serve it with serve.vllm.max_lora_rank >= {rank} (one of "
                "8, 16, 32, 64, ...), or retrain it with a smaller rank.",
                "adapter_rank_too_large",
                "model",
            )
        served = set(served_lora_targets(self.spec))
        unserved = sorted(adapter_targets(folder) - served)
        if unserved:
            raise ModelRequestError(
                400,
                f"The adapter behind `{self.spec['labels'].get(key, key)}` trains {', '.join(unserved)}, which "
                f"this server does not serve LoRA on (it serves {', '.join(sorted(served))}: the decoder's "
                "linear layers); retrain it with train.lora.target_modules among those (the default all-linear "
                "is).",
                "adapter_targets_unsupported",
                "model",
            )
        return folder

    async def load_model_from_config(self, lora_model_id: str, llm_config):
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        folder = await asyncio.get_running_loop().run_in_executor(None, self._fetch, lora_model_id)
        return DiskMultiplexConfig(
            model_id=lora_model_id, max_total_tokens=None, local_path=folder, lora_assigned_int_id=next(_LORA_IDS)
        )


# ------------------------------------------------------------------------------------ replies


def _single_process_engine_class():
    """Ray Serve LLM's VLLMEngine with vLLM's single-process executor on a CPU (serve.vllm.cpu_single_process):
    Ray Serve LLM asks for the multiprocess one on a CPU and vLLM checks the choice while it builds the config,
    so the executor is set on the config it built (the environment, vllm_cpu_single_process_env, turns V1
    multiprocessing off, which the single-process executor wants on a CPU)."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    class SingleProcessVLLMEngine(VLLMEngine):
        def _prepare_engine_config(self, callback_ctx):
            engine_args, frontend_args, engine_config = super()._prepare_engine_config(callback_ctx)
            engine_args.distributed_executor_backend = "uni"
            engine_config.parallel_config.distributed_executor_backend = "uni"
            return engine_args, frontend_args, engine_config

    return SingleProcessVLLMEngine


class VLLMServer(LLMServer):
    # Serve awaits an async constructor; `single_process`: serve.vllm.cpu_single_process applies (single_process()).
    async def __init__(self, llm_config, spec: dict, single_process: bool = False):  # type: ignore[misc]
        from raytune_app import models

        self.spec = spec
        self.requests, self.cancelled, self.refused = 0, 0, 0
        self.loading: dict[str, asyncio.Lock] = {}
        self.tokenizer = models.load_tokenizer(
            spec["model"]["path"],
            spec["model"].get("tokenizer"),
            spec["model"].get("chat_template"),
            spec["model"].get("trust_remote_code", False),
        )
        # The stop tokens evaluation and the transformers backend stop on (raytune_app/models.py).
        self.stop_ids = models.stop_token_ids(self.tokenizer)
        self.chat_template = spec["model"].get("chat_template")
        await super().__init__(
            llm_config,
            engine_cls=_single_process_engine_class() if single_process else None,
            model_downloader=functools.partial(AdapterLoader, spec),
        )

    # ------------------------------------------------------------------------------ requests

    async def _model_name(self, key: str) -> str:
        """The name vLLM serves `key` under, after loading the adapter (Serve's multiplexed LRU)."""
        if key == BASE:
            return self._llm_config.model_id
        if key not in self.spec["adapters"]:
            raise ModelRequestError(404, f"adapter {key!r} is not served here", "model_not_found", "model")
        disk = await self._load_model(key)
        # One load at a time per adapter: resolve_lora checks "loaded?" and then awaits the load, so two
        # requests for a cold adapter (a drift measurement asks for champion and challenger at once) would
        # both load it, and vLLM refuses the second ("has already been loaded").
        async with self.loading.setdefault(key, asyncio.Lock()):
            try:
                await self.engine.resolve_lora(disk)
            except ValueError as exc:  # vLLM could not load it (a broken file): the model failed, not the request
                if "already been loaded" not in str(exc):
                    raise RuntimeError(f"adapter {key} could not be loaded: {exc}") from None
        return key

    def _request(self, payload: dict, model: str):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        fields = {
            "model": model,
            "max_tokens": payload["max_tokens"],
            "temperature": payload["temperature"],
            "top_p": payload["top_p"],
            "stop": payload.get("stop") or None,
            "seed": payload.get("seed"),
            "stop_token_ids": self.stop_ids,
            "response_format": payload.get("response_format"),
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "request_id": f"raytune-{uuid.uuid4().hex}",
        }
        try:
            if payload["kind"] == "chat" and any(
                prompt.holds_control(self.tokenizer, m["content"]) for m in payload["messages"]
            ):
                # vLLM's chat path would read a typed `<|im_end|>` as the control token (a forged turn): such
                # a prompt goes as our token ids, each message's content tokenised as text (serve/prompt.py).
                ids = prompt.chat_ids(self.tokenizer, payload["messages"])
                wanted = payload.get("top_logprobs") or 0
                return CompletionRequest(prompt=ids, logprobs=wanted if payload.get("logprobs") else None, **fields)
            if payload["kind"] == "chat":
                extra = {"chat_template": self.chat_template} if self.chat_template else {}
                return ChatCompletionRequest(
                    messages=payload["messages"],
                    logprobs=bool(payload.get("logprobs")),
                    top_logprobs=payload.get("top_logprobs") or 0,
                    **fields,
                    **extra,
                )
            return CompletionRequest(prompt=payload["prompt"], logprobs=payload.get("logprobs"), **fields)
        except Exception as exc:  # vLLM's own validation of the request (a response_format it rejects, ...)
            message = str(exc).strip().splitlines()
            raise ModelRequestError(
                400, message[-1] if message else type(exc).__name__, "invalid_value", "response_format"
            ) from None

    async def stream(self, payload: dict):
        """Events for one request as vLLM decodes it."""
        self.requests += 1
        model = await self._model_name(payload.get("adapter", BASE))
        request = self._request(payload, model)
        chat = payload["kind"] == "chat"
        as_chat = hasattr(request, "messages")  # False for a chat sent as token ids (see _request)
        run = self.engine.chat if as_chat else self.engine.completions
        finish, usage = None, None
        prompt_ids: list[int] = []
        completion_ids: list[int] = []
        try:
            # The first words at once, then one event per stream interval (LLMServer's batcher, as Ray Serve
            # LLM's own OpenAI app streams), not one per token: each event crosses the router and the ingress,
            # and at 32 streams a per-token hop costs more CPU than decoding on a small machine. Closed on the
            # way out so a caller that goes away cancels the engine's generator (vLLM aborts the request).
            async with contextlib.aclosing(self._pieces(run(request, None))) as batches:
                async for items in batches:
                    text, logprobs = [], None
                    for item in items:
                        if not isinstance(item, str):  # an ErrorResponse: refused before decoding
                            raise engine_error(item.error.model_dump())
                        for data in sse_data(item):
                            if "error" in data:
                                raise engine_error(data["error"])
                            prompt_ids = data.get("prompt_token_ids") or prompt_ids
                            usage = data.get("usage") or usage
                            for choice in data.get("choices") or []:
                                completion_ids.extend(choice.get("token_ids") or [])
                                delta = (choice.get("delta") or {}).get("content") if as_chat else choice.get("text")
                                piece = choice.get("logprobs")
                                if chat and not as_chat:  # a chat sent as token ids: logprobs in the chat shape
                                    piece = chat_logprobs(piece, payload.get("top_logprobs") or 0)
                                finish = choice.get("finish_reason") or finish
                                text.append(delta or "")
                                logprobs = merge_logprobs(logprobs, piece)
                    if any(text) or logprobs:
                        yield {"delta": "".join(text), "logprobs": logprobs}
        except ModelRequestError:
            self.refused += 1
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away: vLLM aborts the request
            self.cancelled += 1
            raise
        usage = usage or {"prompt_tokens": len(prompt_ids), "completion_tokens": len(completion_ids)}
        yield {
            "delta": "",
            "finish_reason": finish or "stop",
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
        }

    async def _pieces(self, replies):
        """vLLM's stream items in lists: one at a time up to the first that holds generated tokens, so the
        reply's first words leave at once, then gathered per stream interval (LLMServer's batcher): the
        interval's saving without its wait before the first token."""
        async for item in replies:
            try:
                yield [item]
            except BaseException:  # the caller went away before the first words: close vLLM's generator now
                await replies.aclose()
                raise
            if carries_text(item):
                break
        else:
            return
        async with contextlib.aclosing(self._batch_output_stream(replies)) as batches:
            async for items in batches:
                yield items

    async def generate(self, payload: dict) -> dict:
        """The whole reply at once (the last event, with the text and logprobs joined)."""
        parts, logprobs, last = [], None, {}
        async for event in self.stream(payload):
            parts.append(event["delta"])
            logprobs = merge_logprobs(logprobs, event.get("logprobs"))
            last = event
        return {**last, "text": "".join(parts), "logprobs": logprobs}

    # ---------------------------------------------------------------------------------- drift

    async def _prompt_logprobs(self, key: str, ids: list[int], k: int) -> list[dict]:
        """Per position of `ids`, the model's top-k logprobs there (token id -> logprob) and the actual token's."""
        from ray.serve.llm.openai_api_models import CompletionRequest

        request = CompletionRequest(
            model=await self._model_name(key),
            prompt=ids,
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=k,
            request_id=f"raytune-drift-{uuid.uuid4().hex}",
        )
        async for item in self.engine.completions(request, None):
            if getattr(item, "error", None) is not None and not hasattr(item, "choices"):
                raise engine_error(item.error.model_dump())
            positions = item.choices[0].prompt_logprobs or []
            return [
                {int(t): (lp["logprob"] if isinstance(lp, dict) else lp.logprob) for t, lp in (p or {}).items()}
                for p in positions
            ]
        return []

    async def divergence(self, prompt_ids: list[int], reply_ids: list[int], reference: str, candidate: str) -> dict:
        """KL(reference || candidate) along one served exchange, from both adapters' top-k logprobs of the
        prompt + reply (one prefill each, no decoding), at the positions that predict the reply's tokens."""
        ids, k = prompt_ids + reply_ids, self.spec["vllm"]["drift_top_k"]
        p, q = await asyncio.gather(self._prompt_logprobs(reference, ids, k), self._prompt_logprobs(candidate, ids, k))
        start = len(prompt_ids)
        return top_k_kl(p[start:], q[start:]) | {"top_k": k}

    # ---------------------------------------------------------------------------------- state

    async def info(self) -> dict:
        models = getattr(self.engine, "_oai_models", None)
        client = getattr(self.engine, "_engine_client", None)
        processor = getattr(client, "output_processor", None)
        unfinished = processor.get_num_unfinished_requests() if processor is not None else None
        return {
            "name": self.spec["name"],
            "backend": "vllm",
            "model": self.spec["model"]["path"],
            "requests": self.requests,
            "cancelled": self.cancelled,
            "refused": self.refused,
            "engine_unfinished_requests": unfinished,
            "adapters_registered": sorted(getattr(models, "lora_requests", {}) or {}),
            "max_loaded_adapters": self.spec["max_loaded_adapters"],
            "time": time.time(),
        }
