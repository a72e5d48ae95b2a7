"""Ray job entrypoint: the whole pipeline, every stage of the recipe's run.stages in order.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/pipeline.py --recipe recipes/gpu-qlora-sft.yaml [key.sub=value ...]

The same as `raytune-app run` (stages whose inputs are unchanged are reused, so a resubmitted job picks up
where the last one stopped), joined to the cluster the job runs on. An invalid recipe fails before any Ray
work, exit code 2, with every problem in `ray job logs`.
"""

import sys

from raytune_app.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("run", sys.argv[1:]))
