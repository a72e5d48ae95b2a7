"""The train stage: TRL trainers inside a Ray Train TorchTrainer (see run.py for the driver side,
worker.py for what each worker runs)."""
