"""The cluster side, without a cluster: launcher YAMLs against Ray's own schema, KubeRay manifests against
their kinds and the project, GPU recipes against the clusters, `raytune-app validate --gpus`, jobs/."""

import ast
import importlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import ray
import tomllib
import yaml

from raytune_app import cluster, config, fit
from raytune_app.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = [REPO / "cluster" / "aws.yaml", REPO / "cluster" / "gcp.yaml"]
KUBERAY = REPO / "cluster" / "kuberay"
GPU_RECIPES = sorted((REPO / "recipes").glob("gpu-*.yaml"))
TRAINING = [p for p in GPU_RECIPES if config.load(p).train.use_gpu is True]
IMAGE = "ghcr.io/your-org/raytune-app:" + tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
KEY = re.compile(r"^(\s*)(?:- )?([A-Za-z_~][\w.\-/~]*):(?:\s|$)")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _uncommented_keys(path: Path) -> list[str]:
    """Keys (outside block scalars) whose previous non-blank line is not a comment."""
    missing, previous, block_indent = [], "", None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if indent > block_indent:
                continue  # inside a `|` / `>-` block: text, not keys
            block_indent = None
        match = KEY.match(line)
        if match and not previous.lstrip().startswith("#"):
            missing.append(f"{path.name}:{number}: {match.group(2)}")
        if re.search(r":\s*[|>][-+]?\s*$", line):
            block_indent = indent
        previous = line
    return missing


# ------------------------------------------------------------------------------ cluster launcher


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema_and_bootstrap_checks(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    document = _load(path)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(document, schema)
    # What `ray up` does before it talks to the cloud: fill in the provider's defaults, validate again.
    validate_config(prepare_config(document))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_has_our_groups(path):
    document = _load(path)
    groups = {g.name: g for g in fit.groups(document)}
    head = groups[document["head_node_type"]]
    assert head.gpus_per_node == 0, "the head is a CPU node"
    train = [g for g in groups.values() if g.gpus_per_node >= 8]
    serve = [g for g in groups.values() if 0 < g.gpus_per_node < 8]
    assert len(train) == 1 and train[0].min_nodes == 0 and train[0].max_nodes >= 1, "an 8-GPU training group from zero"
    assert len(serve) == 1 and serve[0].min_nodes >= 1, "a GPU serving group that is always up"
    # The custom resources the GPU recipes pin training workers and LLM replicas with, one per GPU.
    assert head.custom == {} and train[0].custom == {"train_gpu": 8} and serve[0].custom == {"serve_gpu": 4}
    assert document["max_workers"] >= sum(g.max_nodes for g in groups.values() if g is not head)
    assert 0 < document["idle_timeout_minutes"] <= 30
    nodes = document["available_node_types"]
    train_config = nodes[train[0].name]["node_config"]
    serve_config = nodes[serve[0].name]["node_config"]
    if document["provider"]["type"] == "aws":
        assert train_config["InstanceMarketOptions"]["MarketType"] == "spot"
        assert "InstanceMarketOptions" not in serve_config
    else:
        assert train_config["scheduling"]["provisioningModel"] == "SPOT"
        assert serve_config["scheduling"].get("provisioningModel", "STANDARD") == "STANDARD"
        for name, node in ((train[0].name, train_config), (serve[0].name, serve_config)):
            attached = sum(a["acceleratorCount"] for a in node["guestAccelerators"])
            assert attached == groups[name].gpus_per_node
    # The project is copied from this checkout and installed on every node; the shared volume is mounted.
    assert document["file_mounts"] == {"~/raytune": "."}
    assert any("-e ~/raytune" in c and "ray[" in c for c in document["setup_commands"])
    assert any("/mnt/shared" in c and "mount" in c for c in document["initialization_commands"])
    assert any(
        "--autoscaling-config" in c and "--dashboard-port=8265" in c for c in document["head_start_ray_commands"]
    )


@pytest.mark.parametrize("path", [*LAUNCHER, *sorted(KUBERAY.glob("*.yaml"))], ids=lambda p: p.name)
def test_every_key_of_the_cluster_files_is_commented(path):
    assert _uncommented_keys(path) == []


# ------------------------------------------------------------------------------ KubeRay

# Fields the KubeRay v1 CRDs require (rayStartParams became optional in KubeRay 1.4; kept for older operators).
REQUIRED = {
    "RayCluster": ["headGroupSpec"],
    "RayJob": ["entrypoint", "rayClusterSpec"],
    "RayService": ["serveConfigV2", "rayClusterConfig"],
}


def _manifest(name: str) -> dict:
    return _load(KUBERAY / name)


def _cluster_spec(document: dict) -> dict:
    spec = document["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        document["kind"]
    ]


def _containers(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def _in_repo(path: str) -> Path:
    """A path inside the image (/app is the project, cluster/Dockerfile), or one relative to the project (a
    serve config deployed from its root), as a path of this checkout."""
    assert path.startswith("/app/") or not path.startswith("/"), path
    return REPO / path.removeprefix("/app/")


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_kuberay_manifest_has_the_fields_of_its_kind(name):
    document = _manifest(name)
    assert document["apiVersion"] == "ray.io/v1" and document["metadata"]["name"]
    for key in REQUIRED[document["kind"]]:
        assert key in document["spec"], f"{name}: spec.{key} is required for {document['kind']}"
    spec = _cluster_spec(document)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert "template" in spec["headGroupSpec"] and "rayStartParams" in spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "template", "rayStartParams", "minReplicas", "maxReplicas"} <= set(group)
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        gpus, _ = fit._pod_resources(group["template"])
        assert gpus > 0, f"{name}: worker group {group['groupName']} has no GPU"
        # One `train_gpu` / `serve_gpu` per GPU (rayStartParams.resources): what the GPU recipes ask for.
        custom = {"gpu-train": "train_gpu", "gpu-serve": "serve_gpu"}[group["groupName"]]
        assert fit._start_params_resources(group) == {custom: gpus}, group["rayStartParams"]
        # GPU pods tolerate the GPU taint and land on the matching nodes.
        pod = group["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    for container in _containers(spec):
        assert container["image"] == IMAGE, "every pod runs the project image built from cluster/Dockerfile"
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}.items() >= {
        "gcs-server": 6379,
        "dashboard": 8265,
    }.items()


def test_image_and_shared_volume_exist_in_the_project():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    assert IMAGE in dockerfile and "pip install --no-cache-dir -e ." in dockerfile
    for folder in re.findall(r"^COPY (\w+) \./\w+$", dockerfile, re.M):
        assert (REPO / folder).is_dir()
    claim = _manifest("shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        spec = _cluster_spec(_manifest(name))
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            claims = [
                v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v
            ]
            assert claims == [claim["metadata"]["name"]]
    # The recipes keep their runs on that volume.
    for path in GPU_RECIPES:
        assert config.load(path).run.output_dir.startswith("/mnt/shared/")


def test_rayjob_runs_the_pipeline_entrypoints_of_the_project():
    document = _manifest("rayjob.yaml")
    commands = [c.strip().split() for c in document["spec"]["entrypoint"].split("&&")]
    assert [c[:2] for c in commands] == [["python", "/app/jobs/pipeline.py"], ["python", "/app/jobs/guard.py"]]
    for command in commands:
        assert _in_repo(command[1]).is_file()
        recipe = _in_repo(command[command.index("--recipe") + 1])
        assert config.load(recipe)
    assert build_parser().parse_args(["guard", *commands[1][2:]]).action == "train"
    runtime_env = yaml.safe_load(document["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) <= {"env_vars"}, "the code is in the image: no working_dir, no installs"
    assert document["spec"]["shutdownAfterJobFinishes"] is True and document["spec"]["submissionMode"] == "K8sJobMode"
    # Its cluster is raycluster.yaml's head and training group.
    full = _manifest("raycluster.yaml")["spec"]
    spec = document["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"] == full["headGroupSpec"]
    assert spec["workerGroupSpecs"] == [g for g in full["workerGroupSpecs"] if g["groupName"] == "gpu-train"]


def test_rayservice_serves_the_gpu_cluster_serve_config():
    from ray.serve.schema import ServeDeploySchema

    document = _manifest("rayservice.yaml")
    served = yaml.safe_load(document["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    shipped = _load(REPO / "serve_configs" / "gpu-cluster.yaml")
    (app,) = served["applications"]
    (shipped_app,) = shipped["applications"]
    # serve_configs/gpu-cluster.yaml, but on the GPU recipe inside the image.
    assert app["args"]["recipe"] == "/app/recipes/gpu-qlora-sft.yaml"
    assert {**app, "args": {**app["args"], "recipe": shipped_app["args"]["recipe"]}} == shipped_app
    assert {k: v for k, v in served.items() if k != "applications"} == {
        k: v for k, v in shipped.items() if k != "applications"
    }
    module, attribute = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    served_recipe = config.load(_in_repo(app["args"]["recipe"]), app["args"]["overrides"])
    assert served_recipe.serve.host == "0.0.0.0"
    # The LLM replicas ask for the custom resource the serving group declares (cluster/*, rayStartParams).
    assert {n: served_recipe.serve.deployments[n].resources for n in ("llm", "backup")} == {
        "llm": {"serve_gpu": 1},
        "backup": {"serve_gpu": 1},
    }
    spec = document["spec"]["rayClusterConfig"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": served["http_options"]["port"], "name": "serve"} in head["ports"]
    # Its cluster is raycluster.yaml's head and serving group, which holds the deployments' GPUs.
    full = _manifest("raycluster.yaml")["spec"]
    assert spec["headGroupSpec"] == full["headGroupSpec"]
    assert spec["workerGroupSpecs"] == [g for g in full["workerGroupSpecs"] if g["groupName"] == "gpu-serve"]
    low, high = _serve_config_gpus(app)
    (group,) = [g for g in fit.groups(document) if g.gpus_per_node]
    assert low <= group.min_nodes * group.gpus_per_node and high <= group.max_nodes * group.gpus_per_node


def _serve_config_gpus(app: dict) -> tuple[float, float]:
    # vLLM deployments take their GPU in a placement group sized from the recipe's serve.deployments (a
    # config-level ray_actor_options would give it to the replica actor instead), so that is where it is read.
    recipe = config.load(_in_repo(app["args"]["recipe"]), app["args"]["overrides"])
    low = high = 0.0
    for deployment in app["deployments"]:
        gpus = deployment.get("ray_actor_options", {}).get("num_gpus")
        if gpus is None:
            section = recipe.serve.deployments.get(deployment["name"])
            gpus = (section.num_gpus or 0) if section else 0
        scaling = deployment.get("autoscaling_config")
        replicas = (
            (scaling["min_replicas"], scaling["max_replicas"]) if scaling else (deployment.get("num_replicas", 1),) * 2
        )
        low, high = low + replicas[0] * gpus, high + replicas[1] * gpus
    return low, high


# ------------------------------------------------------------------------------ GPU recipes x clusters

CLUSTERS = [*LAUNCHER, KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"]


@pytest.mark.parametrize("cluster_file", CLUSTERS, ids=lambda p: p.name)
@pytest.mark.parametrize("recipe_file", TRAINING, ids=lambda p: p.name)
def test_gpu_recipe_fits_the_cluster_and_one_training_node(recipe_file, cluster_file):
    recipe = config.load(recipe_file)
    document = fit.load_cluster_file(str(cluster_file))
    report = fit.check(recipe, *fit.capacity(document), fit.groups(document))  # custom resources checked too
    assert report.ok, report.problems
    biggest = max(g.gpus_per_node for g in fit.groups(document))
    steps = [recipe.chain_step(i) for i in range(len(recipe.chain))] or [recipe]
    for step in steps:
        # ZeRO-2 keeps its all-reduce inside one node: the workers fit the largest GPU node.
        assert step.train.use_gpu is True and step.train.workers <= biggest
        assert step.train.worker_resources == {"train_gpu": 1}, "training workers stay on the training nodes"
        assert step.train.workers == 1 or step.train.deepspeed.stage == 2  # one-GPU runs (tune trials) need no ZeRO
    assert cluster.gpus_wanted(recipe) <= biggest
    if "evaluate" in recipe.run.stages:
        assert recipe.evaluate.replicas <= biggest


@pytest.mark.parametrize("cluster_file", [*LAUNCHER, KUBERAY / "raycluster.yaml"], ids=lambda p: p.name)
def test_serving_recipe_fits_the_serving_group(cluster_file):
    recipe = config.load(REPO / "recipes" / "gpu-qlora-sft.yaml")
    deployments = fit.serve_replicas(recipe)
    low = sum(d["min"] * d["gpus"] for d in deployments.values())
    high = sum(d["max"] * d["gpus"] for d in deployments.values())
    document = fit.load_cluster_file(str(cluster_file))
    (serving,) = [g for g in fit.groups(document) if 0 < g.gpus_per_node < 8]
    assert 0 < low <= serving.min_nodes * serving.gpus_per_node, "the endpoint starts without waiting for a node"
    report = fit.check(recipe, *fit.capacity(document), fit.groups(document))
    assert report.ok and not [n for n in report.notes if "resources" in n], report.notes
    # The LLM replicas stay on the serving nodes: the custom resource only that group declares.
    assert serving.custom == {"serve_gpu": serving.gpus_per_node}
    for name in ("llm", "backup"):
        assert recipe.serve.deployments[name].resources == {"serve_gpu": 1}
    assert high <= serving.max_nodes * serving.gpus_per_node, "autoscaling reaches every replica"
    # The recipe's layout is serve_configs/gpu-cluster.yaml's.
    (app,) = _load(REPO / "serve_configs" / "gpu-cluster.yaml")["applications"]
    assert _serve_config_gpus(app) == (low, high)


def test_gpu_dpo_recipe_trains_dpo_on_preference_data():
    recipe = config.load(REPO / "recipes" / "gpu-dpo.yaml")
    assert recipe.train.method == "dpo" and recipe.data.kind == "preference"
    assert recipe.train.finetuning == "qlora"  # LoRA: the reference is a frozen copy of the adapter, not a 2nd model


# ------------------------------------------------------------------------------ validate --gpus


def test_validate_gpus_lists_what_will_not_fit(capsys):
    recipe = str(REPO / "recipes" / "gpu-qlora-sft.yaml")
    assert main(["validate", recipe, "--gpus", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: 3 thing(s) will not fit a cluster of 1 GPU(s):" in err
    assert "train: train.workers=8 needs 8 GPUs (one per worker), the cluster has 1" in err
    assert "evaluate: evaluate.replicas=8 needs 8 GPUs, the cluster has 1" in err
    assert "serve: the minimum replicas need 2 GPUs (llm 1..8 x 1, backup 1..2 x 1), the cluster has 1" in err

    assert main(["validate", recipe, "--gpus", "0"]) == 2
    assert "train.use_gpu is true but the cluster has no GPUs" in capsys.readouterr().err

    assert main(["validate", recipe, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits: train: 8 worker(s) x 1 GPU (qlora, DeepSpeed ZeRO-2)" in out
    assert "note: serve: at most 10 GPUs at the maximum replicas, the cluster has 8" in out
    assert out.rstrip().endswith("fits a cluster of 8 GPU(s)")


def test_validate_against_a_cluster_file_and_on_cpus(capsys):
    recipe = str(REPO / "recipes" / "gpu-chain.yaml")
    assert main(["validate", recipe, "--cluster", str(REPO / "cluster" / "aws.yaml")]) == 0
    out = capsys.readouterr().out
    assert "fits: train, chain step 2 `house_style`: 8 worker(s) x 1 GPU" in out
    assert "fits a cluster of 28 GPU(s), 344 CPU(s) (" in out  # 2 x 8 + 3 x 4 GPUs; 8 + 2 x 96 + 3 x 48 CPUs
    # The CPU quickstart on a 2-core laptop fits; with 4 CPU workers it does not.
    quickstart = str(REPO / "recipes" / "quickstart.yaml")
    assert main(["validate", quickstart, "--gpus", "0", "--cpus", "2"]) == 0
    assert main(["validate", quickstart, "train.workers=4", "--gpus", "0", "--cpus", "2"]) == 2
    assert "train: train.workers=4 needs 4 CPUs, the cluster has 2" in capsys.readouterr().err
    assert main(["validate", quickstart, "--cluster", str(REPO / "README.md")]) == 2
    capsys.readouterr()
    # Custom resources no group declares, or more than the groups hold at their largest: never placed.
    pinned = ["train.worker_resources={spot_h100: 1}", "serve.deployments.llm.resources={serve_gpu: 13}"]
    sft = str(REPO / "recipes" / "gpu-qlora-sft.yaml")
    assert (
        main(["validate", sft, *pinned, "run.stages=[train,serve]", "--cluster", str(REPO / "cluster/aws.yaml")]) == 2
    )
    err = capsys.readouterr().err
    assert "train: train.worker_resources names ['spot_h100'], which no node group of the cluster declares" in err
    assert "(it declares: serve_gpu, train_gpu)" in err
    assert (
        "serve.deployments.llm.resources: the minimum 1 replica(s) ask for 13 serve_gpu, the cluster declares 12" in err
    )


def test_vllm_teacher_and_tune_trials_are_counted():
    dss = config.load(
        REPO / "recipes" / "dss.yaml",
        [
            "distill.teacher.backend=vllm",
            "distill.teacher.model=Qwen/Qwen2.5-7B-Instruct",
            "distill.teacher.replicas=4",
            "train.use_gpu=true",
            "train.workers=2",
            "run.stages=[distill,train,tune]",
        ],
    )
    report = fit.check(dss, gpus=2)
    assert "distill: the vllm teacher's 4 replica(s) need 4 GPUs, the cluster has 2" in report.problems[0]
    # tune.max_concurrent_trials is read with getattr: the tune section may not have it yet.
    if "max_concurrent_trials" in type(dss.tune).model_fields:
        dss = config.validate(dss.resolved() | {"tune": dss.tune.model_dump() | {"max_concurrent_trials": 3}})
    else:
        object.__setattr__(dss, "tune", SimpleNamespace(max_concurrent_trials=3))
    problems = fit.check(dss, gpus=4).problems
    assert any(
        p.startswith("tune: tune.max_concurrent_trials=3 x train.workers=2 = 6 GPUs at once, the cluster has 4")
        for p in problems
    )
    assert cluster.gpus_wanted(dss, "distill") == 4 and cluster.gpus_wanted(dss, "train") == 2


def test_gpus_a_job_asks_the_autoscaler_for():
    sft = config.load(REPO / "recipes" / "gpu-qlora-sft.yaml")
    assert cluster.gpus_wanted(sft) == 8 and cluster.gpus_wanted(sft, "train") == 8
    assert cluster.gpus_wanted(sft, "prepare") == 0 and cluster.gpus_wanted(sft, "register") == 0
    # `use_gpu: auto` takes what the cluster has, so it asks for nothing (the CPU quickstart).
    assert cluster.gpus_wanted(config.load(REPO / "recipes" / "quickstart.yaml")) == 0


# ------------------------------------------------------------------------------ jobs/ and docs


def test_job_entrypoints_are_thin_and_documented():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    entrypoints = sorted((REPO / "jobs").glob("*.py"))
    assert {p.stem for p in entrypoints} >= {"pipeline", "prepare", "train", "evaluate", "register", "serve"}
    for path in entrypoints:
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        assert "ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml" in doc
        assert f"python jobs/{path.stem}.py" in doc
        for recipe in re.findall(r"--recipe (recipes/[\w.-]+\.yaml)", doc):
            assert (REPO / recipe).is_file(), f"{path.name} documents {recipe}"
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run_job"]
        assert len(calls) == 1 and calls[0].args[0].value in commands
        assert len(path.read_text().splitlines()) < 25


def test_runtime_env_needs_no_network_and_skips_big_folders():
    from ray.runtime_env import RuntimeEnv

    runtime_env = _load(REPO / "jobs" / "runtime_env.yaml")
    RuntimeEnv(**runtime_env)  # Ray's own validation of the fields
    assert not {"pip", "conda", "uv", "container", "image_uri"} & set(runtime_env)
    assert {".venv/", "runs/", "mlruns/", ".git"} <= set(runtime_env["excludes"])
    assert {".venv/", "runs/", "mlruns/"} <= set((REPO / ".rayignore").read_text().split())


def test_cluster_readme_names_files_that_exist():
    text = (REPO / "cluster" / "README.md").read_text()
    named = set(
        re.findall(
            r"(?<![\w/])((?:cluster|recipes|jobs|serve_configs)/[\w./-]+\.(?:yaml|py|md)|cluster/Dockerfile)", text
        )
    )
    assert {
        "cluster/aws.yaml",
        "cluster/gcp.yaml",
        "cluster/kuberay/rayjob.yaml",
        "cluster/kuberay/rayservice.yaml",
        "jobs/pipeline.py",
        "recipes/gpu-qlora-sft.yaml",
    } <= named
    for path in named:
        assert (REPO / path).exists(), path


def test_serve_defaults_match_the_serve_app():
    from raytune_app.serve.app import DEFAULT_CPUS

    # fit.py keeps a copy so that `validate` does not import Ray Serve.
    assert fit._SERVE_DEFAULT_CPUS == DEFAULT_CPUS


@pytest.mark.extended
def test_waiting_for_gpus_the_cluster_cannot_get_gives_up_with_the_reason(ray_local):
    with pytest.raises(
        cluster.NoCluster, match=r"still has 0 GPU\(s\) after 1 s, this stage needs 8: check the GPU worker"
    ):
        cluster.wait_for_gpus(8, timeout_s=1)
    cluster.wait_for_gpus(0)  # nothing wanted: returns at once


ADDRESS_PROBE = """
import os
import ray
from raytune_app import cluster

# Another Ray is up on the machine (the test session's), then ours starts.
cluster.start_local(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
assert "RAY_ADDRESS" not in os.environ and "RAY_GCS_SERVER_PORT" not in os.environ  # ours only for Ray

@ray.remote(num_cpus=0)
def lookup():
    from ray._private.services import canonicalize_bootstrap_address_or_die
    return canonicalize_bootstrap_address_or_die(None)  # what Ray's State API client asks

print("OWN" if ray.get(lookup.remote()) == ray.get_runtime_context().gcs_address else "OTHER", flush=True)
"""


def test_a_local_ray_started_here_tells_its_workers_its_own_address(ray_local):
    """With another Ray up on the machine (the session's `ray_local`), a worker's address lookup (Ray Train's
    placement-group cleaner asks the State API through it whether its controller lives) finds this cluster:
    without it the lookup fails with "multiple active Ray instances", or reads the other cluster and takes a
    live run for dead."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", ADDRESS_PROBE], capture_output=True, text=True, timeout=240, env=_without_ray_address()
    )
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "OWN", done.stderr[-3000:]


def _without_ray_address() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
