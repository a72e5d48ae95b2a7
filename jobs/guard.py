"""Ray job entrypoint: the prompt-injection guard (train / eval / score), the classifier serving puts in front.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/guard.py train --recipe recipes/gpu-guard.yaml

Arguments are those of `raytune-app guard`; the job joins the cluster it runs on (never a new local Ray).
recipes/gpu-guard.yaml registers the guard under the shared run directory, where the GPU recipes'
serving looks for it (models:/guard@champion in /mnt/shared/raytune/runs/guard/mlflow.db).
"""

import sys

from raytune_app.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("guard", sys.argv[1:]))
