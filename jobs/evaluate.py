"""Ray job entrypoint: the evaluate stage (base vs tuned metrics on the held-out split (Ray Data batch inference)).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/evaluate.py --recipe recipes/gpu-qlora-sft.yaml [--force] [key.sub=value ...]

Arguments are those of `raytune-app evaluate`; the job joins the cluster it runs on (never a new local Ray)
and writes to the recipe's run.output_dir, which on a cluster is shared storage (NFS path, s3://, gs://).
"""

import sys

from raytune_app.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("evaluate", sys.argv[1:]))
