"""The evaluate stage: batch generation on Ray Data, task metrics, the report."""
