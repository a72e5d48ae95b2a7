"""Ray job entrypoint: the distill stage (teacher rationales for Distilling Step-by-Step (Ray Data)).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/distill.py --recipe recipes/dss.yaml [--force] [key.sub=value ...]

Arguments are those of `raytune-app distill`; the job joins the cluster it runs on (never a new local Ray)
and writes to the recipe's run.output_dir, which on a cluster is shared storage (NFS path, s3://, gs://).
"""

import sys

from raytune_app.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("distill", sys.argv[1:]))
