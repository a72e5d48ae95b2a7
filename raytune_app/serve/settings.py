"""The recipe's `serve` section: what the Ray Serve app serves and how (raytune_app/serve/app.py builds it).

Every field is documented where it is declared (`raytune-app validate --explain` prints them). Model
references are a local folder, a `bundled:` name, or a registry URI `models:/<name>@<alias>` /
`models:/<name>/<version>`, resolved to a fixed version when the app is built, so every replica
serves the same weights. Plain pydantic; no Ray.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raytune_app.sections import Section

DEPLOYMENTS = ("ingress", "router", "guard", "llm", "backup")


class BatchingSection(Section):
    max_batch_size: int = Field(
        8, ge=1, description="Most requests one forward pass serves (`@serve.batch`); 1 turns batching off."
    )
    batch_wait_timeout_s: float = Field(
        0.1,
        ge=0,
        description="How long a replica waits for a batch to fill before it starts with what it has: longer "
        "fills batches (throughput), shorter answers a lone request sooner. On a 2-core CPU 0.15 s gave full "
        "batches of 16 and 4x the unbatched throughput where 0.02 s gave batches of 2-3 (benchmarks/serve_load.py); "
        "on a GPU ~0.01.",
    )


class LimitsSection(Section):
    default_max_tokens: int = Field(256, ge=1, description="Completion tokens when a request does not set max_tokens.")
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for (400 above it).")
    default_temperature: float = Field(
        1.0,
        ge=0,
        le=2,
        description="Temperature when a request does not set one (OpenAI's default is 1.0; 0 is greedy, "
        "better for extraction models).",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="Longest prompt accepted, in tokens (400 above it); left out: the model's context length "
        "minus max_tokens.",
    )
    timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds a model has for a request (the primary, then the backup: each gets this long; a "
        "stream: to its first token and between tokens) before it is cancelled; then the backup answers, or 503.",
    )
    guard_timeout_s: float = Field(
        10.0, gt=0, description="Seconds the guard has to score a prompt before the request gets 503 (fail closed)."
    )
    max_body_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="Largest request body accepted, in bytes (413 above it, before the body is parsed). 1 MB holds "
        "far more text than any context here takes.",
    )
    max_messages: int = Field(256, ge=1, description="Most messages (or content parts) one chat request may hold.")
    max_stop: int = Field(4, ge=0, le=16, description="Most stop strings a request may give (OpenAI allows 4).")
    max_stop_chars: int = Field(
        64,
        ge=1,
        description="Longest stop string, in characters: every generated token is checked against each stop "
        "string, so their length is paid per token.",
    )
    max_json_depth: int = Field(
        32, ge=4, description="Deepest nesting of arrays / objects a request body may have (400 beyond)."
    )
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A replica whose model has work but has not finished a step (a decoding step, a guard "
        "batch) for this long reports itself unhealthy, and Serve replaces it.",
    )
    retry_after_s: int = Field(
        1,
        ge=0,
        description="`Retry-After` seconds on a 429 (a full queue). OpenAI's client waits that long and retries.",
    )


class GuardServeSection(Section):
    mode: Literal["enforce", "monitor", "off"] = Field(
        "enforce",
        description="`enforce`: prompts scored at or above the threshold are refused (HTTP 400) and never reach "
        "a model; `monitor`: scored, logged and counted, but served; `off`: no guard deployment.",
    )
    model: str = Field(
        "models:/guard@champion",
        description="The trained guard (`raytune-app guard train`): a registry URI or a "
        "folder holding guard.json and model/.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow store the guard is registered in; left out: where `raytune-app guard train` with "
        "recipes/guard.yaml registers it (sqlite:///<run.output_dir>/guard/mlflow.db).",
    )
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Score at or above which a prompt is an attack; left out: the threshold the guard "
        "was trained with (chosen for its target false-positive rate).",
    )
    max_batch_size: int = Field(
        16, ge=1, description="Requests the guard batches together, and windows it scores in one forward pass."
    )
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="Wait for a guard batch to fill.")
    window_overlap: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="The guard reads every message whole, in windows of its max length (newest message first; "
        "the decision is the worst window): the share of a window the next one overlaps. 0.5: any stretch up to "
        "half a window lies whole inside one.",
    )
    max_windows: int = Field(
        256,
        ge=1,
        description="Most windows the guard reads of one request; longer prompts are refused in enforce mode "
        "(fail closed; the context limit keeps ordinary prompts far below: 2,000 tokens are ~32 windows).",
    )
    cache_windows: int = Field(
        4096,
        ge=0,
        description="Window scores a guard replica remembers (least recently used dropped): a conversation "
        "resends its history and an app its system prompt each time, so only new text is read again. 0: off.",
    )
    compile: bool = Field(
        True,
        description="When the guard scores in bf16 (a CPU with native bf16 and a guard calibrated for it: "
        "guard.inference `auto`), compile its model at replica start (torch.compile, weights frozen): a batch-1 "
        "128-token window ~12% faster than eager bf16, ~27% than int8, on a 2-core AMX Xeon, for ~40 s more "
        "start-up. No effect on int8 / float32 guards; where compiling fails the eager model serves, with a warning.",
    )
    expose_score: bool = Field(
        False,
        description="Tell clients the guard's score and threshold (response header, refusal body, /v1/stats). "
        "Off: a client cannot search for a prompt that scores just under the threshold.",
    )


class DriftSection(Section):
    threshold: float = Field(
        0.08,
        gt=0,
        description="Mean KL divergence (champion || challenger, next-token distributions over served "
        "replies) above which the challenger is rolled back.",
    )
    window: int = Field(64, ge=1, description="Requests in the sliding window the mean is taken over.")
    min_samples: int = Field(8, ge=1, description="Requests measured before the monitor may roll back.")
    sample_rate: float = Field(1.0, gt=0, le=1, description="Share of requests whose divergence is measured.")
    rollback: bool = Field(
        True, description="Roll the challenger back when drift passes the threshold (else only log)."
    )


class RouterSection(Section):
    canary_percent: float = Field(
        0.0, ge=0, le=100, description="Share of requests to the served name that the challenger answers (0: none)."
    )
    shadow: bool = Field(
        False,
        description="Send the challenger a copy of every champion request; its answer is compared and measured, "
        "never returned.",
    )
    seed: int = Field(0, description="Seed of the canary draw (reproducible splits).")
    max_background: int = Field(
        16,
        ge=1,
        description="Most shadow copies and drift measurements in flight at once; beyond it new ones are skipped "
        "(counted), so a burst cannot queue unbounded work behind the served requests.",
    )
    rollback_retry_s: float = Field(
        30.0,
        gt=0,
        description="When moving the challenger's registry alias back fails (registry unreachable), retry after "
        "this long, until it is done (the `raytune_rollback_pending` metric is 1 meanwhile).",
    )
    drift: DriftSection = Field(default_factory=DriftSection, description="Drift monitoring and automatic rollback.")


class AccessSection(Section):
    api_keys_env: str | None = Field(
        "RAYTUNE_API_KEYS",
        description="Environment variable holding accepted API keys (comma-separated). Unset or empty, "
        "and no file: the API is open.",
    )
    api_keys_file: str | None = Field(
        None,
        description="File with one accepted API key per line (a mounted secret); `#` starts a comment. A file "
        "holding no key is an error.",
    )
    allow_open: bool = Field(
        False,
        description="Serve without API keys on a non-loopback host. Without it, an app listening beyond "
        "127.0.0.1 / ::1 with no key configured refuses to start.",
    )


class PriceSection(Section):
    prompt_per_1k: float = Field(0.0, ge=0, description="Cost of 1,000 prompt tokens (any currency unit).")
    completion_per_1k: float = Field(0.0, ge=0, description="Cost of 1,000 completion tokens.")


class AutoscalingSection(Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 lets the deployment scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Requests in flight per replica the autoscaler aims at."
    )

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class DeploymentSection(Section):
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count (use either this or autoscaling).")
    autoscaling: AutoscalingSection | None = Field(None, description="Replica bounds and the load target.")
    num_cpus: float | None = Field(None, ge=0, description="CPUs each replica reserves.")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs each replica reserves (1 for an LLM replica on a GPU node)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica asks for (name -> amount), e.g. {serving_node: 1} to "
        "keep the replicas on the nodes that declare it (`ray start --resources`, a node type's `resources:`). "
        "For a vLLM deployment they go into the engine's placement group, which holds the replica too.",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests a replica works on at once; left out: 2 x the engine's batch for llm / backup "
        "(batching.max_batch_size, or vllm.max_num_seqs on vLLM), 64 for guard, 1000 for router; for ingress the "
        "primary's admission capacity plus half of it (at least 2), split over the ingress replicas.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="Requests waiting for a free replica slot, per caller, beyond which the surplus is refused "
        "at once: 429 with Retry-After (OpenAI's client retries it). Left out: 2 x the engine's batch for llm / "
        "backup, 256 for guard, for ingress the headroom above (past it Serve's proxy refuses, before the "
        "ingress reads the body); the router's queue is its own limit (max_ongoing).",
    )
    health_check_period_s: float | None = Field(
        None, gt=0, description="Seconds between Serve's health checks of a replica (Serve's default: 10)."
    )
    health_check_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Seconds a health check may take before the replica counts as unhealthy (Serve's default: 30).",
    )

    @model_validator(mode="after")
    def _one_way(self):
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        builtin = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(self.resources))
        if builtin:
            raise ValueError(f"resources: set {builtin} with num_cpus / num_gpus; name only custom resources here")
        bad = sorted(name for name, amount in self.resources.items() if amount <= 0)
        if bad:
            raise ValueError(f"resources: amounts must be above 0 ({bad})")
        return self


# LoRA ranks vLLM's engine accepts for max_lora_rank (vllm.config.LoRAConfig).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMServeSection(Section):
    max_lora_rank: int = Field(
        16,
        description=f"Largest LoRA rank the engine takes (one of {list(VLLM_LORA_RANKS)}); vLLM reserves "
        "memory for it, so keep it at the largest adapter you serve. An adapter above it gets HTTP 400.",
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Longest prompt + completion in tokens; left out: the model's own context length.",
    )
    max_num_seqs: int = Field(64, ge=1, description="Sequences the engine decodes at once (vLLM's continuous batch).")
    kv_cache_gb: int = Field(
        1,
        ge=1,
        description="KV cache size in whole GiB on a CPU (VLLM_CPU_KVCACHE_SPACE); on a GPU, "
        "gpu_memory_utilization sizes it instead.",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of the GPU's memory vLLM takes (weights + KV cache)."
    )
    enforce_eager: bool = Field(
        False,
        description="Skip torch.compile / CUDA graphs: starts faster, decodes slower (tests and tiny models).",
    )
    stream_interval_ms: float | None = Field(
        None,
        ge=0,
        description="A streamed reply's first words go out at once, the rest in pieces gathered over this many "
        "milliseconds (Ray Serve LLM's stream batching), not a token at a time: fewer hops through router and "
        "ingress under load; 0 streams every token as it comes. Unset: 50 on a GPU (Ray Serve LLM's own), 250 on a "
        "CPU, where each piece's hops take CPU from decoding (BENCHMARKS.md: 250 gave 1.1-1.3x the tokens/s of 50 "
        "at 32 clients on 2 cores).",
    )
    cpu_single_process: bool = Field(
        True,
        description="On a CPU, run the model inside vLLM's engine-core process (its single-process executor, one "
        "thread per whole core of the deployment) instead of the worker process vLLM's CPU build spawns, which "
        "its engine core waits on in a spin loop on a core of its own. On 2 cores: +26% requests/s at capacity "
        "and the surplus refused sooner (BENCHMARKS.md, serving under overload). Ignored on a GPU.",
    )
    drift_top_k: int = Field(
        20,
        ge=1,
        le=20,
        description="Drift on vLLM is KL over each position's top-k tokens of both models plus one bucket for "
        "the rest (vLLM returns at most 20 logprobs per position): a lower bound of the full-vocabulary KL.",
    )
    engine_kwargs: dict = Field(
        default_factory=dict,
        description="Any other vLLM engine argument (vllm.AsyncEngineArgs), passed as given; set here it wins "
        "over the fields above.",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank: vLLM accepts {list(VLLM_LORA_RANKS)}, got {self.max_lora_rank}")
        return self


class ServeSection(Section):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on (`0.0.0.0` on a cluster).")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP port of the app.")
    docs: bool = Field(False, description="Serve the interactive API docs at /docs and the schema at /openapi.json.")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Model id clients send in `model` for the routed model "
        "(champion, with the challenger's canary share); left out: the registered model name.",
    )
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto",
        description="Generation backend: `vllm` (Ray Serve LLM's LLMServer running vLLM: continuous batching, "
        "multi-LoRA, structured outputs, logprobs, seed; `vllm-cpu` on CPU machines), `transformers` "
        "(our own dynamic batching over transformers' generate; no response_format, logprobs or seed), or "
        "`auto`: vllm wherever vLLM is installed (scripts/setup.sh installs it), else transformers.",
    )
    backup_backend: Literal["same", "vllm", "transformers"] = Field(
        "same",
        description="Backend of the `backup` replica: `same` as `backend`, or the other one (a transformers "
        "backup is independent of the vLLM engine and small on a CPU).",
    )
    vllm: VLLMServeSection = Field(default_factory=VLLMServeSection, description="The vLLM engine (backend vllm).")
    champion: str | None = Field(
        None,
        description="Adapter the routed name serves; left out: `models:/<registered name>@champion` of this recipe's "
        "registry, or the bare base model when nothing is registered yet. `base` forces the bare base model.",
    )
    challenger: str | None = Field(
        None,
        description="Adapter receiving canary / shadow traffic; left out: `models:/<registered name>@challenger` when "
        "router.canary_percent > 0 or router.shadow, and only if it differs from the champion.",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="More LoRA adapters of the same base, served by name (`model: <name>`), loaded on "
        "first use and evicted least-recently-used: name -> registry URI or folder.",
    )
    max_loaded_adapters: int = Field(
        4,
        ge=1,
        description="Adapters a replica keeps loaded at once (LRU eviction beyond); with vLLM on a GPU also "
        "the engine's LoRA slots (max_loras, max_cpu_loras). vLLM on a CPU keeps every adapter of the app "
        "plus a spare slot (vllm_stream.lora_slots: a workaround for vLLM 0.32's CPU LoRA kernels).",
    )
    backup: str | None = Field(
        "base",
        description="Model answering when the primary fails or times out: `base` (the bare base model, its own "
        "replica), a model path, or null for no failover.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Inference dtype (weights stay fp32 on CPU; autocast)."
    )
    threads: int | None = Field(None, ge=1, description="Torch threads per LLM replica; left out: torch's default.")
    batching: BatchingSection = Field(
        default_factory=BatchingSection, description="Dynamic batching of the LLM replicas."
    )
    limits: LimitsSection = Field(default_factory=LimitsSection, description="Request limits and the failover timeout.")
    guard: GuardServeSection = Field(default_factory=GuardServeSection, description="The guard classifier in front.")
    router: RouterSection = Field(default_factory=RouterSection, description="Canary, shadow and drift rollback.")
    access: AccessSection = Field(default_factory=AccessSection, description="API keys.")
    pricing: dict[str, PriceSection] = Field(
        default_factory=dict,
        description="Price per served model id (`*` for any other), for the cost metric.",
    )
    deployments: dict[str, DeploymentSection] = Field(
        default_factory=dict,
        description=f"Replicas and resources per deployment ({', '.join(DEPLOYMENTS)}); a serve "
        "config's `deployments:` list can override them again.",
    )

    @model_validator(mode="after")
    def _check(self):
        unknown = sorted(set(self.deployments) - set(DEPLOYMENTS))
        if unknown:
            raise ValueError(f"deployments: unknown deployment(s) {unknown}; known: {list(DEPLOYMENTS)}")
        if self.limits.default_max_tokens > self.limits.max_tokens:
            raise ValueError("limits.default_max_tokens is above limits.max_tokens")
        router = self.deployments.get("router")
        if router is not None and (router.autoscaling is not None or (router.num_replicas or 1) > 1):
            raise ValueError(
                "deployments.router: the router holds the canary / rollback state; it runs as exactly one replica"
            )
        reserved = {"base"} | ({self.name} if self.name else set())
        clash = sorted(reserved & set(self.adapters))
        if clash:
            raise ValueError(f"adapters: name(s) {clash} are taken (the routed name and `base`)")
        return self
