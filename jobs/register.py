"""Ray job entrypoint: the register stage (log the trained weights to MLflow as a model version and move its aliases).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/register.py --recipe recipes/gpu-qlora-sft.yaml [key.sub=value ...]

Arguments are those of `raytune-app register`; the job joins the cluster it runs on (never a new local Ray)
and writes to the recipe's run.output_dir, which on a cluster is shared storage (NFS path, s3://, gs://).
"""

import sys

from raytune_app.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("register", sys.argv[1:]))
