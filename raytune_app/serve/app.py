"""Build the Ray Serve application from a recipe: ingress -> router -> {guard, LLM, backup LLM}.

    serve run serve_configs/quickstart.yaml          # import_path: raytune_app.serve.app:build_app
    raytune-app serve --recipe recipes/quickstart.yaml

`plan(recipe)` resolves everything the replicas need into plain dicts first (registry aliases become
fixed versions, so every replica serves the same weights and a promotion during serving does not
split them); it fails with a clear message, before any replica starts, when something named is not
there. `build_app({"recipe": PATH, "overrides": [...]})` is the builder Serve configs import;
`run(recipe)` starts the same app on a local Ray for the CLI and tests.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from raytune_app import config, shared_dir, storage
from raytune_app.errors import DataError
from raytune_app.serve.engine import BASE
from raytune_app.serve.router import ROUTED

logger = logging.getLogger(__name__)

# CPUs each replica reserves unless serve.deployments says otherwise: they add up to 2, so the whole app
# fits a 2-core laptop; on a cluster set num_gpus for llm / backup instead.
DEFAULT_CPUS = {"llm": 1.0, "backup": 0.5, "guard": 0.25, "router": 0.0, "ingress": 0.25}


class ServePlanError(DataError):
    """Something the serve section names is not there; the message says what and what to do."""


class GuardMissing(ServePlanError):
    """The guard the serve section names has not been trained / registered yet."""


def _registry():
    from raytune_app.registry import store

    return store


def _resolve_adapter(tracking_uri: str, ref: str, field: str) -> dict:
    """{ref: a fixed reference, label: what responses name it, registry: {...} or None} for an adapter."""
    if ref.startswith("models:/"):
        store = _registry()
        try:
            version = store.version_of(tracking_uri, ref)
        except store.RegistryError as exc:
            raise ServePlanError(f"serve.{field}: {ref} is not in the registry at {tracking_uri}: {exc}") from None
        label = f"{version.name}/{version.version}"
        return {
            "ref": f"models:/{label}",
            "label": label,
            "registry": {"tracking_uri": tracking_uri, "name": version.name, "version": str(version.version)},
        }
    local = storage.local_dir(ref) if "://" in ref else ref
    if not os.path.exists(os.path.join(local, "adapter_config.json")):
        raise ServePlanError(f"serve.{field}: no LoRA adapter at {ref} (adapter_config.json missing)")
    return {"ref": ref, "label": os.path.basename(os.path.normpath(ref)) or ref, "registry": None}


def _default_or_given(tracking_uri: str, given: str | None, default: str, field: str) -> dict | None:
    """The given reference (which must exist), or the default registry alias (which may not exist yet)."""
    if given is not None:
        return _resolve_adapter(tracking_uri, given, field)
    try:
        return _resolve_adapter(tracking_uri, default, field)
    except ServePlanError as exc:
        logger.warning("%s", exc)
        return None


def guard_tracking_uri(recipe: config.Recipe) -> str:
    """Where the guard is registered: serve.guard.tracking_uri, else where recipes/guard.yaml puts it."""
    if recipe.serve.guard.tracking_uri:
        return recipe.serve.guard.tracking_uri
    return f"sqlite:///{storage.absolute(recipe.run.output_dir).rstrip('/')}/guard/mlflow.db"


def _guard_spec(recipe: config.Recipe) -> dict | None:
    cfg = recipe.serve.guard
    if cfg.mode == "off":
        return None
    ref, uri = cfg.model, guard_tracking_uri(recipe)
    version = ref
    if ref.startswith("models:/"):
        store = _registry()
        try:
            found = store.version_of(uri, ref)
        except store.RegistryError as exc:
            raise GuardMissing(
                f"serve.guard.model: {ref} is not in {uri} ({exc}). Train one with `raytune-app guard train "
                f"--recipe recipes/guard.yaml`, point serve.guard.model at a guard folder, or set "
                f"serve.guard.mode: off"
            ) from None
        version = f"{found.name}/{found.version}"
        ref = f"models:/{version}"
    elif not storage.exists(storage.join(ref, "guard.json")):
        raise GuardMissing(f"serve.guard.model: no trained guard at {ref} (guard.json missing)")
    return {
        "model": ref,
        "version": version,
        "tracking_uri": uri,
        "threshold": cfg.threshold,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "window_overlap": cfg.window_overlap,
        "max_windows": cfg.max_windows,
        "cache_windows": cfg.cache_windows,
        "compile": cfg.compile,
        "stall_timeout_s": recipe.serve.limits.stall_timeout_s,
    }


def plan(recipe: config.Recipe) -> dict:
    """Everything the deployments are built from, resolved and checked."""
    from transformers import AutoConfig

    from raytune_app import models

    store = _registry()
    s = recipe.serve
    uri = store.tracking_uri(recipe)
    registered = store.model_name(recipe)
    served = s.name or registered
    model = recipe.model.model_dump(mode="json")

    adapters, versions = {}, {BASE: "base"}
    champion_key, challenger_key, challenger_registry = BASE, None, None
    if s.champion != "base":
        champion = _default_or_given(uri, s.champion, f"models:/{registered}@champion", "champion")
        if champion is None:
            logger.warning(
                "serving the bare base model %s: nothing is registered as %s@champion yet",
                recipe.model.path,
                registered,
            )
        else:
            champion_key = "champion"
            adapters[champion_key], versions[champion_key] = champion["ref"], champion["label"]
    if s.router.canary_percent > 0 or s.router.shadow:
        challenger = _default_or_given(uri, s.challenger, f"models:/{registered}@challenger", "challenger")
        if challenger is not None and challenger["ref"] == adapters.get(champion_key):
            logger.warning("no challenger: %s@challenger is the champion itself", registered)
        elif challenger is not None:
            challenger_key, challenger_registry = "challenger", challenger["registry"]
            adapters[challenger_key], versions[challenger_key] = challenger["ref"], challenger["label"]
    routes = {served: ROUTED, "base": BASE}
    for index, (name, ref) in enumerate(s.adapters.items()):
        # PEFT names adapters inside module names: the key must not hold ".", whatever the served name does.
        resolved, key = _resolve_adapter(uri, ref, f"adapters.{name}"), f"adapter{index}"
        adapters[key], versions[key] = resolved["ref"], resolved["label"]
        routes[name] = key

    context = getattr(
        AutoConfig.from_pretrained(models.resolve(recipe.model.path), trust_remote_code=recipe.model.trust_remote_code),
        "max_position_embeddings",
        2048,
    )
    # Loaded here first: a model without a chat template stops the plan, and the ingress replicas load the class
    # AutoTokenizer chose without importing AutoTokenizer (and with it torch).
    tokenizer = models.load_tokenizer(
        model["path"], model.get("tokenizer"), model.get("chat_template"), model.get("trust_remote_code", False)
    )
    try:
        backend = models.generation_backend(s.backend, model)
    except ValueError as exc:
        raise ServePlanError(f"serve.backend: {exc}") from None
    llm = {
        "name": "llm",
        "backend": backend,
        "model": model,
        "model_id": served,  # what the vLLM engine calls the base model (its OpenAI model name)
        "labels": {key: name for name, key in routes.items()},  # adapter key -> the model id clients send
        "vllm": s.vllm.model_dump(mode="json"),
        "adapters": adapters,
        "tracking_uri": uri,
        "precision": s.precision,
        "threads": s.threads,
        "max_batch_size": s.batching.max_batch_size,
        "batch_wait_timeout_s": s.batching.batch_wait_timeout_s,
        "max_loaded_adapters": s.max_loaded_adapters,
        "stall_timeout_s": s.limits.stall_timeout_s,
    }
    backup = None
    if s.backup is not None:
        backup_model = model if s.backup == "base" else {"path": s.backup}
        try:
            backup_backend = (
                backend if s.backup_backend == "same" else models.generation_backend(s.backup_backend, backup_model)
            )
        except ValueError as exc:
            raise ServePlanError(f"serve.backup_backend: {exc}") from None
        backup = llm | {"name": "backup", "backend": backup_backend, "model": backup_model, "adapters": {}}
    router = {
        "name": served,
        "routes": routes,
        "champion": champion_key,
        "challenger": challenger_key,
        "versions": versions,
        "challenger_registry": challenger_registry,
        "canary_percent": s.router.canary_percent,
        "shadow": s.router.shadow,
        "seed": s.router.seed,
        "drift": s.router.drift.model_dump(),
        "timeout_s": s.limits.timeout_s,
        "backup_backend": backup["backend"] if backup else None,
        "guard_mode": s.guard.mode,
        "pricing": {k: v.model_dump() for k, v in s.pricing.items()},
        # Hardening (serve/router.py): bounded calls, the 429 hint, what clients may see, background caps.
        "guard_timeout_s": s.limits.guard_timeout_s,
        "retry_after_s": s.limits.retry_after_s,
        "expose_guard_score": s.guard.expose_score,
        "max_windows": s.guard.max_windows,
        "max_background": s.router.max_background,
        "rollback_retry_s": s.router.rollback_retry_s,
        "admission_capacity": admission_capacity(recipe, backend),
    }
    ingress = {
        "backend": backend,
        "models": sorted(routes),
        "model": model,
        "tokenizer_class": models.tokenizer_class_path(tokenizer),
        "limits": s.limits.model_dump(),
        "context_length": context,
        "max_prompt_tokens": s.limits.max_prompt_tokens,
        "admission": ingress_admission(recipe, backend),
        "api_keys_env": s.access.api_keys_env,
        "api_keys_file": recipe.resolve_source(s.access.api_keys_file) if s.access.api_keys_file else None,
        "host": s.host,
        "allow_open": s.access.allow_open,
        "docs": s.docs,
    }
    _check_access(ingress)
    return {"llm": llm, "backup": backup, "guard": _guard_spec(recipe), "router": router, "ingress": ingress}


def _check_access(ingress: dict) -> None:
    """Keys as this process sees them: an empty key file, or an open API on a non-loopback host, stops the plan
    here (the ingress replicas check again with their own environment)."""
    from raytune_app.serve import access

    try:
        keys = access.load_keys(ingress["api_keys_env"], ingress["api_keys_file"])
        access.require_keys(keys, ingress["host"], ingress["allow_open"])
    except (OSError, ValueError) as exc:
        raise ServePlanError(str(exc)) from None


def _queues(recipe: config.Recipe, name: str, backend: str = "transformers") -> tuple[int, int | None]:
    """Backpressure defaults: how many requests a replica works on, and how many may wait per caller before
    the surplus is refused at once (serve/settings.py DeploymentSection). A transformers replica decodes one
    batch at a time: two batches' worth in flight keeps the next batch ready; two more may wait. A vLLM
    replica decodes `serve.vllm.max_num_seqs` sequences at once: the same rule with that as its batch."""
    batch = recipe.serve.vllm.max_num_seqs if backend == "vllm" else recipe.serve.batching.max_batch_size
    return {
        "llm": (2 * batch, 2 * batch),
        "backup": (2 * batch, 2 * batch),
        "guard": (64, 256),
        "router": (1000, None),
    }[name]


def _ingress_queues(recipe: config.Recipe, backend: str) -> tuple[int, int]:
    """The ingress's slots follow the primary's admission capacity, plus headroom (half of it, at least 2) for
    health probes, /v1/models, /v1/stats and the requests the guard or the router refuse at once; split over
    the ingress replicas (their fixed count, or the autoscaler's minimum), with a queue of the headroom at
    Serve's proxy. Past that the proxy answers 429 + Retry-After itself, before any of our code reads the
    body: in a flood the surplus costs the least it can, and the requests admitted keep the CPU."""
    capacity = admission_capacity(recipe, backend)
    headroom = max(2, capacity // 2)
    return -(-(capacity + headroom) // _ingress_replicas(recipe)), headroom


def _ingress_replicas(recipe: config.Recipe) -> int:
    """The ingress replicas its slots are split over: the fixed count, or the fewest the autoscaler keeps."""
    cfg = recipe.serve.deployments.get("ingress")
    if cfg is not None and cfg.num_replicas:
        return cfg.num_replicas
    if cfg is not None and cfg.autoscaling is not None:
        return max(1, cfg.autoscaling.min_replicas)
    return 1


def ingress_admission(recipe: config.Recipe, backend: str) -> int:
    """How many chat / completion requests one ingress replica passes on to the router at once: its share of
    the primary's admission capacity. Past it the ingress answers 429 + Retry-After before reading the body
    (no JSON, no tokenising, no router call): in a flood the surplus is told at once. With more ingress
    replicas than the share assumes (an autoscaler scaling up) the router's exact count still refuses."""
    return -(-admission_capacity(recipe, backend) // _ingress_replicas(recipe))


def admission_capacity(recipe: config.Recipe, backend: str) -> int:
    """How many requests the primary LLM deployment can hold at once: its replicas (the most the autoscaler may
    start) times their `max_ongoing_requests`, plus the router's queue of `max_queued_requests`. The router
    refuses a request beyond it (429) before the guard reads it: in an overload the surplus then costs no guard
    forward pass, and is answered at once; the LLM's own queue stays the exact check below this bound."""
    options = _options(recipe, "llm", backend)
    replicas = options.get("num_replicas") or (options.get("autoscaling_config") or {}).get("max_replicas", 1)
    return replicas * options["max_ongoing_requests"] + options.get("max_queued_requests", 0)


def _options(recipe: config.Recipe, name: str, backend: str = "transformers") -> dict:
    """Deployment options from serve.deployments.<name> (replicas, autoscaling, resources, queues, health);
    `backend`: the LLM deployments' engine (their queue defaults follow its batch)."""
    from ray.serve.config import BackpressureConfig

    cfg = recipe.serve.deployments.get(name)
    actor: dict[str, Any] = {"num_cpus": DEFAULT_CPUS[name]}
    ongoing, queued = _ingress_queues(recipe, backend) if name == "ingress" else _queues(recipe, name, backend)
    options: dict = {"name": name, "max_ongoing_requests": ongoing}
    if cfg is not None and cfg.max_queued_requests is not None:
        queued = cfg.max_queued_requests
    if queued is not None:
        options["max_queued_requests"] = queued
    if name == "ingress":
        # Past the ingress's own queue Serve's proxy answers itself: 429 with Retry-After, as the models' queues do.
        retry = recipe.serve.limits.retry_after_s
        options["backpressure_config"] = BackpressureConfig(status_code=429, retry_after_s=retry or None)
    if cfg is None:
        return options | {"ray_actor_options": actor}
    for field in ("health_check_period_s", "health_check_timeout_s"):
        if getattr(cfg, field) is not None:
            options[field] = getattr(cfg, field)
    if cfg.num_cpus is not None:
        actor["num_cpus"] = cfg.num_cpus
    if cfg.num_gpus is not None:
        actor["num_gpus"] = cfg.num_gpus
    if cfg.resources:  # custom resources: which nodes the replicas may go to
        actor["resources"] = dict(cfg.resources)
    options["ray_actor_options"] = actor
    if cfg.num_replicas is not None:
        options["num_replicas"] = cfg.num_replicas
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    if cfg.max_ongoing_requests is not None:
        options["max_ongoing_requests"] = cfg.max_ongoing_requests
    return options


def _llm_deployment(recipe: config.Recipe, spec: dict):
    """The llm / backup deployment of the spec's backend: Ray Serve LLM's vLLM server, or ours (explicit
    dispatch; both answer the router's stream / generate / divergence / info)."""
    options = _options(recipe, spec["name"], spec["backend"])
    if spec["backend"] == "vllm":
        from raytune_app.serve.vllm_server import build_deployment

        return build_deployment(spec, options)
    from raytune_app.serve.llm import LLMServer

    # `.options` below: @serve.deployment made these classes Deployments at import; mypy sees the class.
    return LLMServer.options(**options).bind(spec)  # type: ignore[attr-defined]


def build(recipe: config.Recipe, spec: dict | None = None):
    """The bound application (nothing starts until Serve runs it); `spec`: an already made plan."""
    from raytune_app.serve.guard_scorer import GuardScorer
    from raytune_app.serve.ingress import Ingress
    from raytune_app.serve.router import Router

    spec = spec or plan(recipe)
    primary = _llm_deployment(recipe, spec["llm"])
    backup = _llm_deployment(recipe, spec["backup"]) if spec["backup"] else None
    guard = (
        GuardScorer.options(**_options(recipe, "guard")).bind(spec["guard"])  # type: ignore[attr-defined]
        if spec["guard"]
        else None
    )
    router = Router.options(**_options(recipe, "router")).bind(  # type: ignore[attr-defined]
        spec["router"], primary, backup, guard
    )
    ingress = _options(recipe, "ingress", spec["llm"]["backend"])  # its slots follow the primary's capacity
    return Ingress.options(**ingress).bind(spec["ingress"], router)  # type: ignore[attr-defined]


def build_app(args: dict):
    """The builder `import_path` names in serve_configs/*.yaml: args {recipe: PATH, overrides: [key=value ...]}."""
    if not isinstance(args, dict) or "recipe" not in args:
        raise ServePlanError("the serve config's `args` must name the recipe: args: {recipe: recipes/<x>.yaml}")
    return build(config.load(args["recipe"], list(args.get("overrides") or [])))


def run(recipe: config.Recipe, blocking: bool = False, spec: dict | None = None) -> str:
    """Start the app on the current (or a new local) Ray; returns the base URL."""
    import ray
    from ray import serve

    application = build(recipe, spec)  # plan first: a bad serve section fails before Ray starts
    if not ray.is_initialized():
        ray.init()
    shared_dir.check(recipe.run_dir)  # replicas on any node load what the run directory holds
    serve.start(http_options={"host": recipe.serve.host, "port": recipe.serve.port})
    serve.run(application, name=recipe.run.name, route_prefix="/", blocking=blocking)
    return f"http://{recipe.serve.host}:{recipe.serve.port}"
