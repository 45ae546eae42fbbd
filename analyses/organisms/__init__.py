"""Model organisms with known spatial-bias answers: building, training, the zoo's recipes.

>>> from analyses.organisms import RECIPES, get
>>> path = get("planted-lm", seed=0)          # shipped, or trained once and cached
>>> interp.load(str(path))

See ``docs/zoo.md`` for what each recipe shows and what it does not say about pretrained LVLMs.
"""
from analyses.organisms.recipes import RECIPES, Recipe
from analyses.organisms.zoo import get

__all__ = ["RECIPES", "Recipe", "get"]
