"""The one resource rule (raytune_app/resources.py) that the train stage, each tune trial and
`validate --gpus` apply: GPU or CPU workers, fp16 only on GPUs, and what can never fit."""

import pytest
from pydantic import ValidationError

from raytune_app.resources import WorkerPlan, even_share, plan_workers, worker_slots
from raytune_app.train.settings import TrainSection


def train(**fields):
    return TrainSection.model_validate({"workers": 2, **fields})


def test_auto_follows_the_cluster():
    assert plan_workers(train(), gpus=4, cpus=16) == WorkerPlan(use_gpu=True, cpus_per_worker=1)
    assert plan_workers(train(), gpus=0, cpus=8) == WorkerPlan(use_gpu=False, cpus_per_worker=4)


def test_cpu_workers_share_the_cores_and_need_one_each():
    assert plan_workers(train(workers=3), gpus=0, cpus=2).problems == (
        "train.workers=3 needs 3 CPUs, the cluster has 2 (each worker takes at least one); lower train.workers",
    )
    assert plan_workers(train(workers=3), gpus=0, cpus=None).problems == ()  # size unknown: not checked


def test_gpu_rules():
    assert "one per worker), the cluster has 1; lower train.workers to 1" in plan_workers(train(), 1, 64).problems[0]
    assert plan_workers(train(use_gpu=True), 0, 64).problems == (
        "train.use_gpu is true but the cluster has no GPUs; set train.use_gpu: auto, or add GPU nodes",
    )
    fp16 = train(precision="fp16")
    assert plan_workers(fp16, 2, 64).problems == ()
    assert plan_workers(fp16, 0, 64).problems[0].startswith("train.precision fp16 needs a GPU")


def test_a_fixed_share_per_worker_for_tune_trials():
    plan = plan_workers(train(), gpus=0, cpus=2, cpus_per_worker=1.5)
    assert plan.cpus_per_worker == 1.5
    assert plan.problems == (
        "train.workers=2 x tune.cpus_per_worker=1.5 needs 3 CPUs, the cluster has 2; lower train.workers or "
        "tune.cpus_per_worker",
    )


def test_a_cpu_worker_never_takes_more_than_one_node_holds():
    # 8 cores on two 4-core nodes: "8 / 2 workers" would ask 4 each, which fits; on four 2-core nodes it
    # would ask 4 each too, a request no node can grant (Ray would wait for ever): 2 each.
    four_by_two = [{"CPU": 2.0}] * 4
    assert plan_workers(train(), gpus=0, cpus=8, nodes=[{"CPU": 4.0}] * 2).cpus_per_worker == 4
    assert plan_workers(train(), gpus=0, cpus=8, nodes=four_by_two).cpus_per_worker == 2
    # A head without CPUs and one big node: both workers share the big node.
    assert plan_workers(train(), gpus=0, cpus=6, nodes=[{"CPU": 0.0}, {"CPU": 6.0}]).cpus_per_worker == 3


def test_custom_resources_narrow_the_nodes_workers_use():
    nodes = [{"CPU": 8.0}, {"CPU": 2.0, "trainer": 1.0}, {"CPU": 2.0, "trainer": 1.0}]
    pinned = train(worker_resources={"trainer": 1})
    assert plan_workers(pinned, gpus=0, cpus=12, nodes=nodes).cpus_per_worker == 2
    assert worker_slots(nodes, 1, {"trainer": 1}) == 2  # one slot per node with the resource
    assert worker_slots(nodes, 1, {}) == 12
    assert even_share(nodes, 3, {"trainer": 1}) == 0  # three workers never fit two slots
    # No node declares it yet (an autoscaler may add one): planned over every node.
    assert plan_workers(train(worker_resources={"gpu_pool": 1}), gpus=0, cpus=12, nodes=nodes).cpus_per_worker == 4


def test_worker_resources_name_custom_resources_only():
    with pytest.raises(ValidationError, match="set by train.workers / use_gpu"):
        train(worker_resources={"CPU": 2})
    with pytest.raises(ValidationError, match="above 0"):
        train(worker_resources={"trainer": 0})
