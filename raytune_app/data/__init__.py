"""The prepare stage and the data rules under it (see prepare.py for the pipeline)."""
