"""Will a recipe fit a cluster?  `raytune-app validate RECIPE --gpus N [--cpus N] [--cluster FILE]`.

Each stage that reserves accelerators is checked against the cluster's size before anything is
submitted, so a job does not wait forever for GPUs the cluster can never have:

- train (and every `chain` step): one GPU per Ray Train worker when workers use GPUs;
- tune: `tune.max_concurrent_trials` trials at once, each a full training run of `train.workers` GPUs
  (read with getattr: the tune section's fields may not exist yet);
- evaluate: `evaluate.replicas` model replicas, one GPU each on a GPU cluster;
- distill: a `vllm` teacher takes one GPU per replica;
- serve: every deployment's `num_gpus` x replicas from `serve.deployments` (the minimum must fit; a
  maximum beyond the cluster only caps autoscaling, which is reported, not refused);
- custom resources, with a cluster file (`groups`): every one `train.worker_resources` and
  `serve.deployments.<name>.resources` name must be declared by a node group (launcher `resources:`, KubeRay
  `rayStartParams.resources`), in amounts that hold the training workers (with their GPUs) and the
  deployments' minimum replicas: else Ray would wait for ever for a node that can never exist.

Stages run one after another (serve stays up at the end), so each is checked against the whole
cluster on its own. `capacity(path)` reads the GPUs and CPUs a cluster file can scale to: a Ray
cluster launcher YAML (cluster/aws.yaml, cluster/gcp.yaml) or a KubeRay RayCluster / RayJob /
RayService manifest. Plain Python; no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raytune_app import resources
from raytune_app.config import Recipe
from raytune_app.train.settings import TrainSection

# Resources Ray itself names; the rest of a node's resources are custom ones (cluster/*.yaml: train_gpu, serve_gpu).
BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})

# CPUs a Serve replica reserves when serve.deployments does not say (raytune_app/serve/app.py's defaults).
_SERVE_DEFAULT_CPUS = {"llm": 1.0, "backup": 0.5, "guard": 0.25, "router": 0.0, "ingress": 0.25}


@dataclass
class FitReport:
    gpus: int
    cpus: int | None
    fits: list[str] = field(default_factory=list)  # what fits, one line per stage
    problems: list[str] = field(default_factory=list)  # what can never fit (exit 2)
    notes: list[str] = field(default_factory=list)  # fits, but not at its largest (autoscaling capped)

    @property
    def ok(self) -> bool:
        return not self.problems


def _gpu_setup(train) -> str:
    """The fits line's summary of how a GPU run trains: fine-tuning, sharding, kernels, optimizer."""
    parts = [train.finetuning]
    if train.uses_deepspeed:
        parts.append(f"DeepSpeed ZeRO-{(train.deepspeed.stage if train.deepspeed else 2)}")
    elif train.sharding == "fsdp":
        parts.append("FSDP2" + (" + CPU offload" if train.fsdp.cpu_offload else ""))
    if train.attn_implementation != "auto":
        parts.append(train.attn_implementation)
    if train.liger:
        parts.append("Liger")
    if train.optimizer != "adamw_torch":
        parts.append(train.optimizer)
    return ", ".join(parts)


def _check_train(where: str, train, report: FitReport) -> None:
    plan = resources.plan_workers(train, report.gpus, report.cpus)
    if plan.problems:
        report.problems.extend(f"{where}: {problem}" for problem in plan.problems)
    elif plan.use_gpu:
        report.fits.append(f"{where}: {train.workers} worker(s) x 1 GPU ({_gpu_setup(train)})")
        kernels = [
            p
            for on, p in ((train.liger, "liger-kernel"), (train.attn_implementation.startswith("flash"), "flash-attn"))
            if on
        ]
        if kernels:
            report.notes.append(f"{where}: the GPU workers' image needs {' and '.join(kernels)} (cluster/Dockerfile)")
    else:
        report.fits.append(f"{where}: {train.workers} worker(s) on CPUs")


def _check_tune(recipe: Recipe, report: FitReport) -> None:
    workers, gpus = recipe.train.workers, report.gpus
    concurrent = getattr(recipe.tune, "max_concurrent_trials", None)
    concurrent = None if concurrent == "auto" else concurrent  # auto: as many as fit (raytune_app/tune/run.py)
    per_trial = workers if resources.workers_on_gpu(recipe.train, gpus) else 0
    if not per_trial:
        report.fits.append("tune: trials train on CPUs")
        return
    if concurrent:
        if concurrent * per_trial > gpus:
            report.problems.append(
                f"tune: tune.max_concurrent_trials={concurrent} x train.workers={workers} = "
                f"{concurrent * per_trial} GPUs at once, the cluster has {gpus}; lower "
                f"tune.max_concurrent_trials to {max(1, gpus // per_trial)}"
            )
        else:
            report.fits.append(f"tune: {concurrent} trial(s) at once x {per_trial} GPU(s)")
    elif per_trial <= gpus:
        report.fits.append(f"tune: up to {gpus // per_trial} trial(s) at once x {per_trial} GPU(s)")
    # per_trial > gpus is already reported by the train check.


def _check_evaluate(recipe: Recipe, report: FitReport) -> None:
    wanted, gpus, cpus = recipe.evaluate.replicas, report.gpus, report.cpus
    if gpus:
        if wanted == "auto":
            report.fits.append(f"evaluate: {gpus} replica(s), one per GPU")
        elif wanted > gpus:
            report.problems.append(
                f"evaluate: evaluate.replicas={wanted} needs {wanted} GPUs, the cluster has {gpus}; "
                "lower it or use auto (one per GPU)"
            )
        else:
            report.fits.append(f"evaluate: {wanted} replica(s) x 1 GPU")
        return
    replicas = 1 if wanted == "auto" else wanted
    if cpus is not None and replicas > cpus:
        report.problems.append(f"evaluate: evaluate.replicas={replicas} needs {replicas} CPUs, the cluster has {cpus}")
    else:
        report.fits.append(f"evaluate: {replicas} replica(s) on CPUs")


def _check_distill(recipe: Recipe, report: FitReport) -> None:
    teacher = recipe.distill.teacher
    if teacher.backend != "vllm":
        report.fits.append(f"distill: teacher `{teacher.backend}` uses no GPU")
    elif teacher.replicas > report.gpus:
        report.problems.append(
            f"distill: the vllm teacher's {teacher.replicas} replica(s) need {teacher.replicas} GPUs, "
            f"the cluster has {report.gpus}; lower distill.teacher.replicas or use the hf / openai teacher"
        )
    else:
        report.fits.append(f"distill: vllm teacher, {teacher.replicas} replica(s) x 1 GPU")


def serve_replicas(recipe: Recipe) -> dict[str, dict]:
    """Per deployment that the serve app will have: min / max replicas and GPUs / CPUs per replica."""
    s = recipe.serve
    present = (
        ["ingress", "router", "llm"] + (["guard"] if s.guard.mode != "off" else []) + (["backup"] if s.backup else [])
    )
    out = {}
    for name in present:
        cfg = s.deployments.get(name)
        low = high = 1
        gpus, cpus = 0.0, _SERVE_DEFAULT_CPUS[name]
        if cfg is not None:
            if cfg.num_replicas is not None:
                low = high = cfg.num_replicas
            elif cfg.autoscaling is not None:
                low, high = cfg.autoscaling.min_replicas, cfg.autoscaling.max_replicas
            gpus = cfg.num_gpus or 0.0
            cpus = cfg.num_cpus if cfg.num_cpus is not None else cpus
        out[name] = {"min": low, "max": high, "gpus": gpus, "cpus": cpus}
    return out


def _check_serve(recipe: Recipe, report: FitReport) -> None:
    deployments = serve_replicas(recipe)
    low = sum(d["min"] * d["gpus"] for d in deployments.values())
    high = sum(d["max"] * d["gpus"] for d in deployments.values())
    shape = ", ".join(f"{name} {d['min']}..{d['max']} x {d['gpus']:g}" for name, d in deployments.items() if d["gpus"])
    if not high:
        cpu_low = sum(d["min"] * d["cpus"] for d in deployments.values())
        if report.cpus is not None and cpu_low > report.cpus:
            report.problems.append(
                f"serve: the deployments' minimum replicas reserve {cpu_low:g} CPUs, the cluster has "
                f"{report.cpus}; lower serve.deployments.<name>.num_cpus or replicas"
            )
        else:
            report.fits.append(f"serve: no GPUs ({cpu_low:g} CPUs at the minimum replicas)")
        return
    if low > report.gpus:
        report.problems.append(
            f"serve: the minimum replicas need {low:g} GPUs ({shape}), the cluster has {report.gpus}; "
            "lower serve.deployments.<name> min_replicas / num_gpus"
        )
    elif high > report.gpus:
        report.fits.append(f"serve: {low:g} GPUs at the minimum replicas ({shape})")
        report.notes.append(
            f"serve: at most {high:g} GPUs at the maximum replicas, the cluster has {report.gpus}: "
            "autoscaling stops where the GPUs run out"
        )
    else:
        report.fits.append(f"serve: {low:g}..{high:g} GPUs ({shape})")


def _train_steps(recipe: Recipe) -> list[tuple[str, TrainSection]]:
    """(where, train section) of the train stage, or of every chain step."""
    if recipe.chain:
        return [
            (f"train, chain step {i + 1} `{step.name}`", recipe.chain_step(i).train)
            for i, step in enumerate(recipe.chain)
        ]
    return [("train", recipe.train)]


def _check_custom(recipe: Recipe, found: list[Group], report: FitReport) -> None:
    """Custom resources the recipe asks for against the groups that declare them (each group at its maximum)."""
    declared = sorted({name for g in found for name in g.custom})
    shown = ", ".join(declared) or "none"

    def undeclared(option: str, wanted: dict, found_in: list[str]) -> bool:
        missing = sorted(set(wanted) - set(declared))
        if missing:
            found_in.append(
                f"{option} names {missing}, which no node group of the cluster declares (it declares: {shown}); "
                "add it to a group's `resources:` (launcher) or `rayStartParams.resources` (KubeRay), or remove it"
            )
        return bool(missing)

    if "train" in recipe.run.stages or "tune" in recipe.run.stages:
        for where, train in _train_steps(recipe):
            wanted = dict(train.worker_resources)
            if not wanted or undeclared(f"{where}: train.worker_resources", wanted, report.problems):
                continue
            need = wanted | ({"GPU": 1.0} if resources.workers_on_gpu(train, report.gpus) else {})
            slots = sum(g.max_nodes * resources.worker_slots([g.node], 0, need) for g in found)
            workers = train.workers
            if slots < workers:
                report.problems.append(
                    f"{where}: train.workers={workers}, each asking for {need}, and the groups that declare "
                    f"{sorted(wanted)} hold {slots} such worker(s) at their largest; raise that resource (or the "
                    "group's max nodes) in the cluster file, or lower train.workers"
                )
            else:
                report.fits.append(f"{where}: {workers} worker(s) on the nodes that declare {sorted(wanted)}")
    # Serving is checked whatever run.stages says (`raytune-app serve` serves any recipe), but a cluster file
    # may be for training only (cluster/kuberay/rayjob.yaml): there, what serving lacks is a note.
    serving = report.problems if "serve" in recipe.run.stages else report.notes
    replicas = serve_replicas(recipe)
    for name, section in recipe.serve.deployments.items():
        if name not in replicas or not section.resources:
            continue
        option = f"serve: serve.deployments.{name}.resources"
        if undeclared(option, section.resources, serving):
            continue
        for resource, amount in section.resources.items():
            have = sum(g.max_nodes * g.custom.get(resource, 0.0) for g in found)
            low = replicas[name]["min"] * amount
            if low > have:
                serving.append(
                    f"{option}: the minimum {replicas[name]['min']} replica(s) ask for {low:g} {resource}, the "
                    f"cluster declares {have:g} at its largest; raise it in the cluster file or lower the replicas"
                )


def check(recipe: Recipe, gpus: int, cpus: int | None = None, groups: list[Group] | None = None) -> FitReport:
    """What of `recipe` fits a cluster that can have `gpus` GPUs (and `cpus` CPUs, when given); with the
    cluster's node `groups` (a cluster file), also whether the custom resources it asks for exist."""
    report = FitReport(gpus=gpus, cpus=cpus)
    stages = recipe.run.stages
    if "distill" in stages:
        _check_distill(recipe, report)
    if "train" in stages or "tune" in stages:
        if recipe.chain:
            for index, step in enumerate(recipe.chain):
                _check_train(f"train, chain step {index + 1} `{step.name}`", recipe.chain_step(index).train, report)
        else:
            _check_train("train", recipe.train, report)
    if "tune" in stages:
        _check_tune(recipe, report)
    if "evaluate" in stages:
        _check_evaluate(recipe, report)
    _check_serve(recipe, report)  # `raytune-app serve` serves any recipe, whether or not serve is in run.stages
    if groups is not None:
        _check_custom(recipe, groups, report)
    return report


# ----------------------------------------------------------------------------------- cluster files


@dataclass
class Group:
    name: str
    min_nodes: int
    max_nodes: int
    gpus_per_node: int
    cpus_per_node: float
    custom: dict[str, float] = field(default_factory=dict)  # custom resources per node (name -> amount)

    @property
    def node(self) -> dict[str, float]:
        """One node's resources as `ray.nodes()` lists them (for raytune_app/resources.py)."""
        return {"CPU": self.cpus_per_node, "GPU": float(self.gpus_per_node), **self.custom}


def _custom(declared: dict) -> dict[str, float]:
    return {name: float(amount) for name, amount in declared.items() if name not in BUILTIN_RESOURCES}


def _start_params_resources(group: dict) -> dict[str, float]:
    """Custom resources of a KubeRay group: `rayStartParams.resources`, JSON inside a quoted string
    ('"{\\"train_gpu\\": 8}"', which KubeRay hands to `ray start --resources`), or plain JSON."""
    import json

    text = (group.get("rayStartParams") or {}).get("resources")
    if not text:
        return {}
    value = json.loads(text)
    return _custom(json.loads(value) if isinstance(value, str) else value)


def _k8s_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _pod_resources(template: dict) -> tuple[int, float]:
    """(GPUs, CPUs) of a KubeRay group's first container, from its resource limits (requests as fallback)."""
    container = template["spec"]["containers"][0]
    resources = container.get("resources", {})
    limits = {**resources.get("requests", {}), **resources.get("limits", {})}
    return int(limits.get("nvidia.com/gpu", 0)), _k8s_quantity(limits.get("cpu", 0))


def groups(document: dict) -> list[Group]:
    """The node groups of a cluster launcher config or a KubeRay RayCluster / RayJob / RayService (head first)."""
    if "available_node_types" in document:
        head = document["head_node_type"]
        out = []
        for name, node in document["available_node_types"].items():
            res = node.get("resources", {})
            low, high = (
                (1, 1)
                if name == head
                else (node.get("min_workers", 0), node.get("max_workers", document.get("max_workers", 0)))
            )
            out.append(Group(name, low, high, int(res.get("GPU", 0)), float(res.get("CPU", 0)), _custom(res)))
        return sorted(out, key=lambda g: g.name != head)
    kind = document.get("kind")
    spec = document.get("spec", {})
    cluster = {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }.get(str(kind))
    if cluster is None:
        raise ValueError(
            f"not a Ray cluster launcher config nor a KubeRay RayCluster / RayJob / RayService (kind {kind!r})"
        )
    head = cluster["headGroupSpec"]
    gpus, cpus = _pod_resources(head["template"])
    out = [Group("head", 1, 1, gpus, cpus, _start_params_resources(head))]
    for group in cluster.get("workerGroupSpecs", []):
        gpus, cpus = _pod_resources(group["template"])
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        out.append(Group(group["groupName"], low, high, gpus, cpus, _start_params_resources(group)))
    return out


def capacity(document: dict) -> tuple[int, int]:
    """(GPUs, CPUs) the cluster has when every group is at its maximum."""
    found = groups(document)
    return (sum(g.max_nodes * g.gpus_per_node for g in found), int(sum(g.max_nodes * g.cpus_per_node for g in found)))


def load_cluster_file(path: str) -> dict:
    """The cluster document in a YAML file (for a multi-document manifest, the one that describes a cluster)."""
    import yaml

    try:
        with open(path) as handle:
            documents = [d for d in yaml.safe_load_all(handle) if isinstance(d, dict)]
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
    for document in documents:
        if "available_node_types" in document or document.get("kind") in ("RayCluster", "RayJob", "RayService"):
            return document
    raise ValueError("no Ray cluster launcher config nor KubeRay RayCluster / RayJob / RayService in it")
