"""The recipe one Ray Tune trial trains: the search's recipe with one sampled point applied to `train`.

Used by the trial function (raytune_app/tune/run.py), by the best recipe (tune/report.py) and by the
MLflow logging of trials (tune/tracking.py); kept apart from run.py so that those two modules do not
import the stage driver that imports them. Plain pydantic; no Ray.
"""

from __future__ import annotations

from raytune_app.config import Recipe
from raytune_app.tune.settings import apply_sample


def trial_recipe(base: dict, sample: dict, source_path: str | None = None) -> Recipe:
    """The recipe one trial trains: the recipe (`base`, resolved to plain data) with `sample`
    (field path -> value) applied to `train`, validated as any recipe is."""
    raw = dict(base)
    raw["train"] = apply_sample(base["train"], sample)
    recipe = Recipe.model_validate(raw)
    recipe.source_path = source_path
    return recipe
