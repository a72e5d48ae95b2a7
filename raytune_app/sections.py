"""The base of every recipe section (a bad recipe raises errors.RecipeError, also config.RecipeError).

Kept apart from config.py so that stage packages (raytune_app/serve/settings.py) can declare their
own sections without importing the whole recipe. Plain pydantic; no Ray.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors (with a did-you-mean); assignment re-validates, so code that edits a
    # loaded recipe (Tune trials, overrides) cannot smuggle in a bad value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
