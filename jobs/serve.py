"""Ray job entrypoint: the serve stage (start the OpenAI-compatible app on Ray Serve; the job ends once it is
up and the app keeps running).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/serve.py --recipe recipes/gpu-qlora-sft.yaml --no-block [key.sub=value ...]

Arguments are those of `raytune-app serve`; the job joins the cluster it runs on (never a new local Ray)
and writes to the recipe's run.output_dir, which on a cluster is shared storage (NFS path, s3://, gs://).
"""

import sys

from raytune_app.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("serve", sys.argv[1:]))
