"""Ray job entrypoint: the train stage: fine-tuning on Ray Train (SFT / DPO; LoRA, QLoRA, DeepSpeed ZeRO).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/train.py --recipe recipes/gpu-qlora-sft.yaml [--resume | --restart] [key.sub=value ...]

Arguments are those of `raytune-app train`; the job joins the cluster it runs on (never a new local Ray)
and writes to the recipe's run.output_dir, which on a cluster is shared storage (NFS path, s3://, gs://).
"""

import sys

from raytune_app.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job("train", sys.argv[1:]))
