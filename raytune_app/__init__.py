"""raytune_app: a Ray-native platform from raw examples to a guarded, monitored endpoint.

Stages (one module or sub-package each): data (prepare), distill, train, tune, evaluate, registry,
serve, guard. The recipe schema is in `config`, the command line in `cli` (`raytune-app --help`).
"""

__version__ = "0.1.0"
