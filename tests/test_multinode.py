"""Multi-node behaviour on a simulated cluster: a Ray head and three worker nodes on this one machine.

Each node is its own raylet (`ray.cluster_utils.Cluster`) with its own CPUs, its own custom resources
(`trainer` on every worker node, and `n1` / `n2` / `n3` naming one node each) and its own temp folder
(TMPDIR in the raylet's environment, which its workers inherit: where node-local scratch goes, as on a
real node's local disk). The run directory is the one folder every node sees, standing for the cluster's
shared filesystem (README "Multi-node"). The head has no CPUs: nothing but the drivers' own actors (Ray
Train's controller, Serve's controller and proxy) runs there, so every piece of work is on a worker node.

What is proven:
- training with 2 workers runs them on 2 different nodes (gloo across raylets), and the manifest says where;
- a worker node killed mid-training (its raylet and every process on it) costs nothing: Ray Train restarts
  the group on the surviving nodes from the last checkpoint and the final weights equal an uninterrupted
  run's;
- serving puts the LLM replica, the guard and the ingress on the nodes their custom resources name, and a
  request crosses them; the LLM replica's node killed under load fails at most the requests in flight
  (cleanly), the backup on another node answers meanwhile, and the replica comes back on a replacement node;
- tune runs two trials at once on two nodes; one trial's node killed after its first checkpoint costs no
  trial: it finishes on the spare node from that checkpoint;
- prepare's blocks are processed and written on several nodes (its manifest says which), and the splits are
  the ones a one-node run (`raytune-app run` with a local Ray of its own) writes, row for row;
- evaluate's two replicas run on two nodes and give the predictions and metrics of a one-node run;
- a node that does not see the run directory (BLIND_NODE sees an empty folder of its own at that path: a
  mount namespace, tests/node_view/sitecustomize.py) stops prepare, train and tune at once with an error
  naming the node and the path, before any work.
Not covered: evaluate's vLLM engine across nodes (the tiny random model is for transformers; one vLLM engine
per replica would add minutes per node on these 2 cores).

One pytest session runs the whole module (`RAYTUNE_EXTENDED=1 pytest tests/test_multinode.py`): one
cluster for all the tests; a test that kills a node adds it back. The simulated head writes its address to
/tmp/ray/ray_current_cluster and Ray deletes that file on shutdown: the fixture puts back what was there, so
a bare `ray.init()` elsewhere on the machine (another session's `raytune-app`) never joins this cluster.

Extended lane (RAYTUNE_EXTENDED=1): the whole module takes about 32 minutes in one session on 2 cores shared
with other work (2026-11-29: cluster start and the reference training 6 min, the lost-node training 4.5,
prepare 2 + 2 with its one-node reference, evaluate 1.5, tune 4, the shared-folder check 10 s). Every wait is
bounded (`time_limit`), so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TOY_ANSWERS, TOY_SCHEMA, free_port, prepare_once, start_local_ray, toy_recipe
from serve_helpers import BENIGN, INJECTION, KEY, guard, wait_until

from raytune_app import config

pytestmark = [pytest.mark.extended, pytest.mark.slow]

WORKER_NODES = ("n1", "n2", "n3")
# The node that does not see the cluster root's `driver-only/` folder (tests/node_view/sitecustomize.py):
# every other folder it sees as the others do.
BLIND_NODE = "n3"
NODE_VIEW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_view")


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError in the test's thread) when the block runs past `seconds`: pytest-timeout is not
    a dependency, and a lost node must never leave the suite waiting for ever."""

    def expired(signum, frame):
        raise TimeoutError(f"the test ran past its limit of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class SimulatedCluster:
    """The head and worker nodes, with each node's temp folder; nodes can be killed and replaced.

    A node is known by its name: the custom resource only it declares (`n1`...), and its TMPDIR, which
    every process of the node (raylet, agents, workers) has in its environment. Killing a node is a SIGKILL
    to all of those at once, as a lost machine does. On a busy machine Ray's fixed 30 s start-up window can
    pass before a raylet registers: the node is then waited for here rather than started twice."""

    def __init__(self, root: str):
        from ray.cluster_utils import Cluster

        self.root = root
        self.tmp: dict[str, str] = {}  # node name -> its TMPDIR
        # A folder of this machine that BLIND_NODE's processes see empty (a node without the shared mount).
        self.driver_only = os.path.join(root, "driver-only")
        os.makedirs(self.driver_only)
        for attempt in range(3):
            head_tmp = self._tmpdir("head")
            try:
                with _ray_address_kept():
                    self.cluster = Cluster(
                        initialize_head=True,
                        head_node_args={
                            "num_cpus": 0,
                            "include_dashboard": False,
                            "env_vars": self._env(head_tmp),
                            **self._ports(),
                        },
                    )
                break
            except Exception as exc:
                self._kill_processes(head_tmp)
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
        for name in WORKER_NODES:
            self.add(name)

    def _env(self, tmp: str, name: str = "head") -> dict:
        # A raylet waits a fixed time for its agents (dashboard, runtime env) to report the ports they
        # picked and aborts past it (ray-project/ray#65983); on 2 busy cores they can take longer to import.
        env = {"TMPDIR": tmp, "RAY_agent_register_timeout_ms": "180000"}
        if name == BLIND_NODE:  # its Python processes mount an empty tmpfs over driver_only at start-up
            path = os.pathsep.join(p for p in (NODE_VIEW, os.environ.get("PYTHONPATH")) if p)
            env |= {"PYTHONPATH": path, "RAYTUNE_TEST_HIDE": self.driver_only}
        return env

    @staticmethod
    def _ports() -> dict:
        """Ports chosen here for a node's agents, so its raylet has none to wait for."""
        names = ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port", "runtime_env_agent_port")
        return {name: free_port() for name in names}

    def _tmpdir(self, name: str) -> str:
        folder = tempfile.mkdtemp(prefix=f"{name}-", dir=self.root)
        self.tmp[name] = folder
        return folder

    def restore(self) -> None:
        """Start again every worker node that is not alive (killed by an earlier test). A node whose raylet is
        gone counts as dead even while the GCS still lists it (its health checks take a while to give up: on 2
        busy cores more than `kill`'s two minutes); its replacement is started once the GCS has let it go, so
        its name resource names one node only."""
        for name in WORKER_NODES:
            if self._alive(name) is not None and self._raylet_running(self.tmp[name]):
                continue
            deadline = time.monotonic() + 300
            while self._alive(name) is not None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {name} is gone, but the cluster still lists it as alive after 5 min")
                time.sleep(1)
            self.add(name)

    def add(self, name: str) -> None:
        """Start worker node `name`: 2 logical CPUs (more than the machine's share: the tiny models need
        little), a `trainer` slot and its own name as a resource, its own TMPDIR; wait until it is up (up to
        5 minutes: on 2 cores shared with other work a raylet and its agents have taken over 3 to start)."""
        for _ in range(3):
            tmp = self._tmpdir(name)
            try:
                self.cluster.add_node(
                    num_cpus=2,
                    resources={"trainer": 1, name: 1},
                    env_vars=self._env(tmp, name),
                    **self._ports(),
                )
            except Exception as exc:
                if "timed out during startup" not in str(exc):
                    raise
            deadline = time.monotonic() + 300
            while self._alive(name) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {name} did not join the cluster")
                if not self._raylet_running(tmp):
                    # The raylet gave up on its dashboard agent: it waits a fixed ~15 s for the agent's port
                    # file and exits past it (ray-project/ray#65983), which a busy machine can exceed. Again.
                    self._kill_processes(tmp)
                    break
                time.sleep(2)
            else:
                return
        raise TimeoutError(f"node {name}: its raylet exited during start-up 3 times (see raylet.*.out of the session)")

    @staticmethod
    def _raylet_running(tmp: str) -> bool:
        import psutil

        for proc in psutil.process_iter(["name"]):
            try:
                if proc.info["name"] == "raylet" and proc.environ().get("TMPDIR") == tmp:
                    return True
            except psutil.Error:
                continue
        return False

    def _alive(self, name: str) -> str | None:
        table = self.cluster.global_state.node_table()
        return next((n["NodeID"] for n in table if n["Alive"] and name in n["Resources"]), None)

    def node_id(self, name: str) -> str:
        found = self._alive(name)
        assert found is not None, f"node {name} is not alive"
        return found

    def name_of(self, node_id: str) -> str:
        table = self.cluster.global_state.node_table()
        resources = next(n["Resources"] for n in table if n["NodeID"] == node_id)
        return next(name for name in WORKER_NODES if name in resources)

    @staticmethod
    def _kill_processes(tmp: str) -> int:
        import psutil

        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("TMPDIR") == tmp:
                    found.append(proc)
            except psutil.Error:
                continue
        for proc in found:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(found, timeout=30)
        return len(found)

    def kill(self, name: str) -> None:
        """Kill worker node `name` without warning: its raylet and every process on it (a lost spot node)."""
        assert self._kill_processes(self.tmp[name]) > 0
        deadline = time.monotonic() + 120  # until the cluster knows (GCS health checks), so nothing goes there
        while self._alive(name) is not None and time.monotonic() < deadline:
            time.sleep(0.5)

    def shutdown(self) -> None:
        with _ray_address_kept():  # Cluster.shutdown deletes /tmp/ray/ray_current_cluster, whoever wrote it
            self.cluster.shutdown()
        for folder in self.tmp.values():  # nodes whose start-up timed out are not the Cluster's to stop
            self._kill_processes(folder)

    def scratch_holders(self) -> list[str]:
        """Nodes whose temp folder holds training scratch now (where a run's workers are)."""
        held = []
        for name in WORKER_NODES:
            scratch = os.path.join(self.tmp[name], "raytune_app", "scratch")
            try:
                if any(os.listdir(os.path.join(scratch, run)) for run in os.listdir(scratch)):
                    held.append(name)
            except OSError:  # none yet, or removed while we looked
                continue
        return held


@contextlib.contextmanager
def _ray_address_kept():
    """Leave /tmp/ray/ray_current_cluster as it was before the block. `Cluster` writes its head's address
    there on start and deletes the file on shutdown; a bare `ray.init()` (a `raytune-app` CLI run, another
    test session on this machine) joins the cluster that file names. So while the simulated cluster runs,
    nothing else joins it by accident, and whatever another session wrote there is still there after."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        before: str | None = open(path).read()
    except OSError:
        before = None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if before is None:
                os.remove(path)
            else:
                with open(path, "w") as out:
                    out.write(before)


@pytest.fixture(autouse=True)
def _every_node_up(request):
    """Before each test on the cluster: all three worker nodes up. A test that kills a node does not start
    its replacement itself (that is minutes on 2 busy cores); the next test that needs the cluster does, so
    the last test of the session pays for none. (Function-scoped: module fixtures that need every node, like
    `served`, call `restore` themselves.)"""
    if "ray_cluster" in request.fixturenames:
        with time_limit(600):
            request.getfixturevalue("ray_cluster").restore()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    was_local = ray.is_initialized()
    if was_local:  # the session's local Ray (other modules' tests): this module needs its own cluster
        ray.shutdown()
    root = tempfile.mkdtemp(prefix="rtmn-", dir="/tmp")  # short: Ray's socket paths live under node folders
    sim = None
    try:
        with time_limit(900):
            sim = SimulatedCluster(root)
            ray.init(address=sim.cluster.address, logging_level="ERROR", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield sim
    finally:
        ray.shutdown()
        if sim is not None:
            sim.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        if was_local:
            start_local_ray()


def _recipe(root, model, **train):
    """The toy recipe trained by 2 workers, one per `trainer` slot (so on 2 different nodes), with a
    checkpoint every 4 of 24 steps; `root` is the run directory every node sees."""
    recipe = toy_recipe(
        root,
        model,
        workers=2,
        worker_resources={"trainer": 1},
        max_steps=24,
        checkpoint={"every_steps": 4, "keep_best": 2},
        max_failures=2,
        **train,
    )
    return config.validate(recipe.resolved() | {"run": recipe.resolved()["run"] | {"name": "mn"}})


def _weights(recipe) -> dict:
    from safetensors.torch import load_file

    path = os.path.join(recipe.stage_dir("train"), "adapter", "adapter_model.safetensors")
    return {name: tensor.clone() for name, tensor in load_file(path).items()}


@pytest.fixture(scope="module")
def reference(ray_cluster, tiny_model, tmp_path_factory):
    """(recipe, manifest) of an uninterrupted 2-node run of `_recipe`."""
    from raytune_app.train.run import train

    recipe = _recipe(tmp_path_factory.mktemp("reference"), tiny_model)
    with time_limit(600):
        prepare_once(recipe)
        manifest = train(recipe)
    return recipe, manifest


def test_training_runs_two_workers_on_two_nodes(ray_cluster, reference):
    recipe, manifest = reference
    nodes = manifest["worker_nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one worker per node: the `trainer` slots
    assert {ray_cluster.name_of(node) for node in nodes} <= set(WORKER_NODES)
    assert manifest["global_step"] == 24 and manifest["resumed_from_step"] is None
    # The driver read what rank 0 wrote on its node (metrics, summary) through the shared run directory.
    assert os.path.exists(os.path.join(recipe.stage_dir("train"), "metrics.jsonl"))
    # Every node's scratch was removed when its worker ended.
    assert ray_cluster.scratch_holders() == []


def test_a_node_lost_mid_training_resumes_on_the_others_with_the_same_weights(
    ray_cluster, reference, tiny_model, tmp_path
):
    from raytune_app.train.run import train

    expected, _ = reference
    recipe = _recipe(tmp_path, tiny_model)
    prepare_once(recipe)
    train_dir = recipe.stage_dir("train")
    killed: list[tuple[str, str]] = []  # (node name, node id)
    problems: list[str] = []

    def kill_after_first_checkpoint():
        try:
            kill_when_saved()
        except Exception as exc:  # reported by the test, not lost with the thread
            problems.append(f"{type(exc).__name__}: {exc}")

    def kill_when_saved():
        # Ray Train records each checkpoint it has (all workers' files uploaded) in this snapshot; the first
        # one recorded means step 4 is saved, and 20 steps (4 more checkpoints) are still to go. (A
        # checkpoint_<time>/ folder appears earlier, while the upload is under way.)
        snapshot = os.path.join(train_dir, "checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            try:
                saved = json.load(open(snapshot)).get("latest_checkpoint_result") is not None
            except (OSError, ValueError):  # not written yet, or being replaced
                saved = False
            holders = ray_cluster.scratch_holders()
            if saved and holders:
                victim = holders[0]
                killed.append((victim, ray_cluster.node_id(victim)))
                ray_cluster.kill(victim)
                return
            time.sleep(0.1)
        problems.append("no checkpoint appeared in time")

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    try:
        with time_limit(600):
            manifest = train(recipe)
            killer.join(timeout=60)
        assert not problems and killed, problems
        victim, victim_id = killed[0]
        # Ray Train restarted the group on the two surviving nodes, from a checkpoint, not from the start.
        assert victim_id not in manifest["worker_nodes"] and len(set(manifest["worker_nodes"])) == 2
        assert manifest["resumed_from_step"] in (4, 8, 12, 16, 20), manifest["resumed_from_step"]
        assert manifest["global_step"] == 24
        # Same world size, same data shards, same restored optimizer and RNG states: the same weights as the
        # uninterrupted run, up to float rounding.
        reference_weights = _weights(expected)
        weights = _weights(recipe)
        assert weights.keys() == reference_weights.keys()
        for name, tensor in reference_weights.items():
            torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=1e-5)
    finally:
        killer.join(timeout=5)  # the killed node comes back before the next test (_every_node_up)


# --- The run directory must be shared: the check before a stage's work -----------------------------------


def test_a_node_that_does_not_see_the_run_directory_stops_the_stage_before_any_work(ray_cluster, tiny_model):
    """The run directory is in `driver-only/`, which BLIND_NODE's processes see as an empty folder of their own
    (a node without the shared mount: tests/node_view/sitecustomize.py; the kernel hides it, not a mock).
    prepare, train and tune each stop at once with one error that names that node, the path and what must be
    shared, and nothing of the stage is written; the other nodes are not named."""
    from raytune_app import shared_dir
    from raytune_app.data.prepare import prepare
    from raytune_app.train.run import train
    from raytune_app.tune.run import tune

    blind = ray_cluster.node_id(BLIND_NODE)
    seeing = [ray_cluster.node_id(name) for name in WORKER_NODES if name != BLIND_NODE]
    recipe = _recipe(Path(ray_cluster.driver_only), tiny_model)
    raw = recipe.resolved()
    raw["tune"] = {"search_space": {"train.learning_rate": {"choice": [5e-3]}}, "algorithm": "grid"}
    tuning = config.validate(raw | {"run": raw["run"] | {"stages": ["prepare", "train", "tune"]}})
    with time_limit(300):
        for stage, call in (("prepare", prepare), ("train", train), ("tune", tune)):
            began = time.monotonic()
            with pytest.raises(shared_dir.NotShared) as caught:
                call(tuning if stage == "tune" else recipe)
            message = str(caught.value)
            assert f"node {blind}" in message and recipe.run_dir in message, message
            assert "run.output_dir" in message and "Multi-node: what every node must see" in message, message
            assert not any(node in message for node in seeing), message
            assert not os.path.exists(recipe.stage_dir(stage)), f"{stage} wrote output before the check"
            print(f"{stage}: stopped by the shared-folder check after {time.monotonic() - began:.1f} s")
        # The check leaves nothing behind in the run directory.
        assert os.listdir(recipe.run_dir) == [], os.listdir(recipe.run_dir)
        # The same check passes on a folder every node sees (the other tests' run directories).
        shared_dir.check(str(Path(ray_cluster.root) / "seen"))
        assert os.listdir(Path(ray_cluster.root) / "seen") == []


# --- Prepare and evaluate: Ray Data work spread over the nodes, the same output as on one node -------------

SOURCES = 6  # source files: the read runs one task per file, so the blocks start out on several nodes


@pytest.fixture(scope="module")
def spread_data(tmp_path_factory):
    """Six JSONL files of the toy task (three JSON answers, a `channel` group), with exact duplicates across
    files (the dedupe actor is asked from every node) and a few bad lines (rejects); and the schema file."""
    folder = tmp_path_factory.mktemp("spread-data")
    for index in range(SOURCES):
        lines = []
        for i in range(40):
            n = index * 40 + i if i % 10 else i  # every tenth row is the same in every file: a duplicate
            lines.append(
                json.dumps(
                    {
                        "q": f"ticket {n}: classify, word {n % 7}",
                        "a": TOY_ANSWERS[n % 3],
                        "channel": ["mail", "chat"][n % 2],
                    }
                )
            )
        lines.insert(7, '{"q": "no answer here"}')  # a row without its response column: rejected
        (folder / f"part-{index}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "schema.json").write_text(json.dumps(TOY_SCHEMA))
    return folder


def _spread_recipe(root: Path, data: Path, model: str) -> config.Recipe:
    """The recipe prepared and evaluated on the cluster and on one node: only its run directory differs."""
    return config.validate(
        {
            "run": {"name": "spread", "output_dir": str(root / "runs"), "stages": ["prepare", "evaluate"]},
            "model": {"path": model},
            "data": {
                "sources": [str(data / f"part-{i}.jsonl") for i in range(SOURCES)],
                "columns": {"prompt": "q", "response": "a"},
                "keep_columns": ["channel"],
                "max_seq_length": 128,
                "split": {"val": 0.15, "test": 0.25},
                "batch_size": 16,
            },
            "evaluate": {
                "backend": "transformers",
                "task": "structured",
                "schema_file": str(data / "schema.json"),
                "group_column": "channel",
                "max_new_tokens": 12,
                "batch_size": 4,
                "replicas": 2,
                "precision": "fp32",
            },
        }
    )


@pytest.fixture(scope="module")
def one_node_run(spread_data, tiny_model, tmp_path_factory):
    """The recipe's prepare and evaluate stages on one node: `raytune-app run` in a subprocess with a local
    Ray of its own (this machine's 2 CPUs), with one evaluate replica of 2 CPUs, as a one-node run has it
    (`auto`; replicas are no part of the evaluation's fingerprint). Returns the recipe (its run dir)."""
    import subprocess
    import sys

    import yaml

    root = tmp_path_factory.mktemp("one-node")
    recipe = _spread_recipe(root, spread_data, tiny_model)
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.resolved()))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env |= {"RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    command = [str(Path(sys.executable).parent / "raytune-app"), "run", "--recipe", str(recipe_file)]
    command.append("evaluate.replicas=1")
    began = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"one-node prepare + evaluate: {time.monotonic() - began:.0f} s")
    return recipe


def _split_rows(recipe, split: str) -> list[dict]:
    """A prepared split's rows by content hash, whatever the part files are. Without their provenance: of
    copies of one example in several blocks, the first block to reach the dedupe actor keeps its copy, which
    can differ from run to run on one node too (blocks run in parallel); the example is the same."""
    import pyarrow.parquet as pq

    folder = os.path.join(recipe.stage_dir("prepare"), split)
    tables = [pq.read_table(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".parquet")]
    rows = [row for table in tables for row in table.drop_columns(["source_file", "source_row"]).to_pylist()]
    return sorted(rows, key=lambda r: r["content_hash"])


def _rejects(recipe) -> tuple[list, list]:
    """(rejected rows other than duplicates, the duplicates' raw rows), provenance-free as in _split_rows."""
    rows = [json.loads(line) for line in open(os.path.join(recipe.stage_dir("prepare"), "rejected.jsonl"))]
    duplicates = sorted(r["raw"] for r in rows if r["reason"] == "duplicate")
    return [r for r in rows if r["reason"] != "duplicate"], duplicates


def test_prepare_spreads_its_blocks_over_nodes_and_writes_what_one_node_writes(
    ray_cluster, spread_data, tiny_model, one_node_run, tmp_path
):
    from raytune_app.data.prepare import prepare

    recipe = _spread_recipe(tmp_path, spread_data, tiny_model)
    with time_limit(300):
        manifest = prepare(recipe)
    nodes = manifest["nodes"]
    # The blocks were parsed, tokenised and written on several worker nodes (the head has no CPUs).
    assert len(nodes) >= 2, nodes
    assert {ray_cluster.name_of(node) for node in nodes} <= set(WORKER_NODES)
    assert sum(n["rows"] for n in nodes.values()) >= 6 * 41
    single = json.load(open(os.path.join(one_node_run.stage_dir("prepare"), "manifest.json")))
    assert len(single["nodes"]) == 1, single["nodes"]
    # Same rows in, same rejects, same splits (content hashes, counts, token statistics) ...
    for key in ("fingerprint", "rows_in", "rows_out", "rejected", "rejected_rows"):
        assert manifest[key] == single[key], key
    # Every tenth row of a file is in all six (4 x 5 extra copies); one row per file lacks its answer.
    assert manifest["rejected"]["duplicate"] == 20 and manifest["rejected_rows"] == 26, manifest["rejected"]
    for split in ("train", "val", "test"):
        ours, theirs = manifest["splits"][split], single["splits"][split]
        assert {k: v for k, v in ours.items() if k != "files"} == {k: v for k, v in theirs.items() if k != "files"}
        # ... and row for row the same content (the part files differ: one per write task).
        assert _split_rows(recipe, split) == _split_rows(one_node_run, split), split
    assert _rejects(recipe) == _rejects(one_node_run)


def test_evaluate_runs_its_replicas_on_two_nodes_with_the_metrics_of_one_node(
    ray_cluster, spread_data, tiny_model, one_node_run, tmp_path
):
    """Two transformers replicas (an actor pool of 2): each takes the 2 CPUs of one node (a share one node can
    grant, not 6 / 2 = 3), so they run on two different nodes; greedy decoding of the same batches gives the
    replies the one replica of a one-node run gives, so the same metrics."""
    import pyarrow.parquet as pq

    from raytune_app.evaluate.run import evaluate

    recipe = _spread_recipe(tmp_path, spread_data, tiny_model)
    shutil.copytree(one_node_run.stage_dir("prepare"), recipe.stage_dir("prepare"))  # same prepared data
    with time_limit(400):
        summary = evaluate(recipe)
    nodes = summary["nodes"]["base"]
    assert len(nodes) == 2 and {ray_cluster.name_of(node) for node in nodes} <= set(WORKER_NODES), nodes
    assert sum(nodes.values()) == summary["examples"]
    single = json.load(open(os.path.join(one_node_run.stage_dir("evaluate"), "metrics.json")))
    assert len(single["nodes"]["base"]) == 1
    timing = ("latency", "seconds")
    assert {k: v for k, v in summary["models"]["base"].items() if k not in timing} == {
        k: v for k, v in single["models"]["base"].items() if k not in timing
    }
    assert summary["fingerprint"] == single["fingerprint"] and summary["examples"] == single["examples"]
    columns = ["example", "prediction"]
    ours = pq.read_table(os.path.join(recipe.stage_dir("evaluate"), "predictions.parquet"), columns=columns)
    theirs = pq.read_table(os.path.join(one_node_run.stage_dir("evaluate"), "predictions.parquet"), columns=columns)
    assert ours.to_pylist() == theirs.to_pylist()


# --- Serving: the LLM replica, the guard and the ingress each on its own node ----------------------------

APP = "mnserve"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model, tmp_path_factory):
    """The serving app of a tiny model on the cluster: the LLM replica pinned to n1, the guard and the backup
    to n2, the ingress to n3 (custom resources), the router wherever Serve puts it. Serve's HTTP proxy runs on
    the head only: every node of this cluster shares one address, so per-node proxies would fight for the
    port (on a real cluster each node has its own address)."""
    from ray import serve

    from raytune_app.serve.app import run
    from raytune_app.tiny import build_tiny_bert

    # Module fixtures are set up before the function-scoped _every_node_up: a node an earlier test killed is
    # started again here, or the replica pinned to it never schedules.
    with time_limit(600):
        ray_cluster.restore()
    root = tmp_path_factory.mktemp("serve")
    guard_folder = guard(build_tiny_bert(root / "guard-bert"), root / "guard")
    keys = root / "keys.txt"
    keys.write_text(KEY + "\n")
    health = {"health_check_period_s": 1, "health_check_timeout_s": 10}
    recipe = config.validate(
        {
            "run": {"name": APP, "output_dir": str(root / "runs")},
            "model": {"path": tiny_model},
            "data": {"generator": {"name": "order_extraction"}},
            "registry": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "model_name": APP},
            "serve": {
                "port": free_port(),
                "backend": "transformers",
                "name": "toy",
                "champion": "base",
                "backup": "base",
                "batching": {"max_batch_size": 2, "batch_wait_timeout_s": 0.05},
                "limits": {"default_max_tokens": 8, "default_temperature": 0.0, "timeout_s": 20},
                "guard": {"model": guard_folder},
                "access": {"api_keys_env": None, "api_keys_file": str(keys)},
                "deployments": {
                    "llm": {"num_cpus": 0.5, "resources": {"n1": 0.1}} | health,
                    "backup": {"num_cpus": 0.5, "resources": {"n2": 0.1}} | health,
                    "guard": {"num_cpus": 0.25, "resources": {"n2": 0.1}} | health,
                    "ingress": {"num_cpus": 0.25, "resources": {"n3": 0.1}},
                    "router": {"num_cpus": 0.25},
                },
            },
        }
    )
    with time_limit(600):
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": recipe.serve.port})
        url = run(recipe)
        wait_until(lambda: _chat(url).status_code == 200, timeout_s=300, what="the app to answer")
    try:
        yield url
    finally:
        serve.shutdown()


def _chat(url: str, content: str = BENIGN, timeout: float = 120):
    import httpx

    body = {"model": "toy", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, json=body, timeout=timeout)


def _replica_nodes(ray_cluster, deployment: str) -> dict[str, str]:
    """{replica actor name: node name} of the deployment's live replicas (from the GCS's actor table)."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    table = ray_cluster.cluster.global_state.actor_table(None)
    return {
        actor["Name"]: ray_cluster.name_of(actor["Address"]["NodeID"])
        for actor in table.values()
        if actor["Name"].startswith(prefix) and actor["State"] == "ALIVE"
    }


def test_serving_runs_the_llm_guard_and_ingress_on_their_own_nodes(ray_cluster, served):
    assert set(_replica_nodes(ray_cluster, "llm").values()) == {"n1"}
    assert set(_replica_nodes(ray_cluster, "guard").values()) == {"n2"}
    assert set(_replica_nodes(ray_cluster, "backup").values()) == {"n2"}
    assert set(_replica_nodes(ray_cluster, "ingress").values()) == {"n3"}
    # A request crosses the nodes: proxy (head) -> ingress (n3) -> router -> guard (n2) -> LLM (n1).
    answer = _chat(served)
    assert answer.status_code == 200 and answer.headers["x-raytune-failover"] == "false", answer.text
    refused = _chat(served, INJECTION)
    assert (refused.status_code, refused.json()["error"]["code"]) == (400, "prompt_refused"), refused.text


def test_a_node_lost_under_serving_load_fails_only_requests_in_flight_and_the_replica_comes_back(ray_cluster, served):
    import httpx

    records: list[dict] = []
    stop = threading.Event()

    def client(index: int):
        with httpx.Client(timeout=90, headers=AUTH) as http:
            i = 0
            while not stop.is_set():
                i += 1
                body = {"model": "toy", "max_tokens": 8, "messages": [{"role": "user", "content": f"order {i}"}]}
                began = time.time()
                try:
                    r = http.post(served + "/v1/chat/completions", json=body)
                    status, text = r.status_code, r.text
                    failover = r.headers.get("x-raytune-failover") == "true"
                except httpx.HTTPError as exc:  # a connection the server dropped: clean, but a failure
                    status, text, failover = type(exc).__name__, "", False
                records.append(
                    {"start": began, "end": time.time(), "status": status, "text": text, "failover": failover}
                )

    before = _replica_nodes(ray_cluster, "llm")
    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(2)]
    try:
        with time_limit(900):
            for thread in clients:
                thread.start()
            wait_until(lambda: sum(r["status"] == 200 for r in records) >= 4, what="steady load")
            killed_at = time.time()
            ray_cluster.kill("n1")  # the LLM replica's node, without warning
            # While n1 is gone the backup (on n2) answers: new requests still succeed.
            wait_until(
                lambda: any(r["start"] > killed_at and r["status"] == 200 for r in records),
                timeout_s=180,
                what="an answer after the node was lost",
            )
            # A replacement node joins (as an autoscaler would start one) and Serve puts the LLM replica there.
            ray_cluster.add("n1")
            wait_until(
                lambda: (
                    set(_replica_nodes(ray_cluster, "llm").values()) == {"n1"}
                    and not set(_replica_nodes(ray_cluster, "llm")) & set(before)
                ),
                timeout_s=300,
                what="the LLM replica rescheduled on the new node",
            )
            wait_until(
                lambda: _chat(served).headers["x-raytune-failover"] == "false", timeout_s=180, what="the LLM answering"
            )
            recovered = time.time()
            wait_until(
                lambda: any(r["start"] > recovered and r["status"] == 200 for r in records),
                timeout_s=120,
                what="the load answered after recovery",
            )
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=100)
    assert all(r["end"] - r["start"] < 90 for r in records)  # nothing hung
    failures = [r for r in records if r["status"] != 200]
    by_status = {str(s): sum(f["status"] == s for f in failures) for s in {f["status"] for f in failures}}
    print(
        f"serving through a lost node: {len(records)} requests, {sum(r['failover'] for r in records)} answered by the "
        f"backup, failures by status: {by_status}"
    )
    for failure in failures:
        # Clean: an HTTP error with a body that is no traceback (or a dropped connection), and only for a
        # request in flight around the loss, never after recovery.
        assert "Traceback" not in failure["text"], failure
        assert failure["status"] in (429, 500, 503, 504) or isinstance(failure["status"], str), failure
        assert killed_at - 90 <= failure["start"] <= recovered, (failure, killed_at, recovered)
    assert len(failures) <= 6, failures
    # While n1 was gone, the router gave up on the LLM deployment (no replica to take the request within
    # serve.limits.timeout_s) and the backup on n2 answered.
    assert any(r["failover"] and r["start"] > killed_at for r in records)
    assert any(r["start"] > recovered and r["status"] == 200 for r in records)


# --- Tuning: trials on different nodes, a node lost mid-search ---------------------------------------------


def test_tune_trials_run_on_different_nodes_and_a_lost_node_costs_no_trial(ray_cluster, tiny_model, tmp_path):
    """Two trials at once, each one worker holding a `trainer` slot, so on two different nodes. The node of
    one of them is killed after its first checkpoint: Ray Train restarts that trial's worker on the spare
    node from the checkpoint, and the search ends with both trials complete."""
    from raytune_app.tune.run import tune

    base = toy_recipe(
        tmp_path,
        tiny_model,
        workers=1,
        worker_resources={"trainer": 1},
        max_steps=16,
        checkpoint={"every_steps": 4, "keep_best": 1},
        max_failures=2,
    )
    raw = base.resolved()
    raw["run"] |= {"name": "mntune", "stages": ["prepare", "train", "tune"]}
    raw["tune"] = {
        "search_space": {"train.learning_rate": {"choice": [5e-3, 2e-3]}},
        "algorithm": "grid",
        "num_samples": 1,
        "max_concurrent_trials": 2,
        "cpus_per_worker": 1,
        "early_stopping": {"asha": False},
    }
    recipe = config.validate(raw)
    prepare_once(recipe)
    trials_dir = os.path.join(recipe.stage_dir("tune"), "trials")
    killed: list[str] = []
    problems: list[str] = []

    def kill_after_a_trial_checkpoint():
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline:
                for trial in os.listdir(trials_dir) if os.path.isdir(trials_dir) else []:
                    snapshot = os.path.join(trials_dir, trial, "train", "checkpoint_manager_snapshot.json")
                    try:
                        saved = json.load(open(snapshot)).get("latest_checkpoint_result") is not None
                    except (OSError, ValueError):
                        saved = False
                    holders = ray_cluster.scratch_holders()
                    if saved and len(holders) == 2:  # both trials are training, each on its node
                        killed.append(holders[0])
                        ray_cluster.kill(holders[0])
                        return
                time.sleep(0.1)
            problems.append("no trial checkpoint while both trials ran")
        except Exception as exc:
            problems.append(f"{type(exc).__name__}: {exc}")

    killer = threading.Thread(target=kill_after_a_trial_checkpoint, daemon=True)
    killer.start()
    try:
        with time_limit(900):
            summary = tune(recipe)
            killer.join(timeout=60)
        assert not problems and killed, problems
        assert summary["trials"] == 2 and not summary.get("interrupted"), summary
        rows = json.load(open(os.path.join(recipe.stage_dir("tune"), "trials.json")))
        assert [row["status"] for row in rows] == ["completed", "completed"], rows
        manifests = [json.load(open(os.path.join(row["dir"], "manifest.json"))) for row in rows]
        finished_on = [ray_cluster.name_of(m["worker_nodes"][0]) for m in manifests]
        # The two trials ended on two nodes, neither the lost one; one of them resumed from its checkpoint.
        assert len(set(finished_on)) == 2 and killed[0] not in finished_on, (finished_on, killed)
        assert sorted(m["resumed_from_step"] is not None for m in manifests) == [False, True], manifests
        assert all(m["global_step"] == 16 for m in manifests)
    finally:
        killer.join(timeout=5)  # the killed node comes back before the next test (_every_node_up)
