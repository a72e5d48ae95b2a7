"""The base of every recipe section, and the error a bad recipe raises.

Kept apart from config.py so that stage packages (raytune_app/serve/settings.py) can declare their
own sections without importing the whole recipe. Plain pydantic; no Ray.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RecipeError(ValueError):
    """A recipe that cannot run. ``problems`` holds one line per problem, each naming the field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe:\n  " + "\n  ".join(problems))


class Section(BaseModel):
    # Unknown keys are errors (with a did-you-mean); assignment re-validates, so code that edits a
    # loaded recipe (Tune trials, overrides) cannot smuggle in a bad value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
