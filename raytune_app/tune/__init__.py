"""The tune stage: Ray Tune searches over training runs (settings.py: the recipe section; run.py: the driver)."""
