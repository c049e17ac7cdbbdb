"""The training engine: YAML recipes, the Accelerate loop, data formats and the ``peftkit`` command line."""

from .loop import RunResult, evaluate, prepare, train
from .recipe import Recipe, from_dict, load_recipe

__all__ = ["Recipe", "RunResult", "evaluate", "from_dict", "load_recipe", "prepare", "train"]
