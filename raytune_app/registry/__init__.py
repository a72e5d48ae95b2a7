"""Tracking and model registry on MLflow (register stage, `raytune-app registry`)."""
