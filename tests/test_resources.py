"""The one resource rule (raytune_app/resources.py) that the train stage, each tune trial and
`validate --gpus` apply: GPU or CPU workers, fp16 only on GPUs, and what can never fit."""

from raytune_app.resources import WorkerPlan, plan_workers
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
