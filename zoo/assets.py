"""Where the top-level `recipes/` and `model_cards/` folders are: in a checkout, or in an install.

A checkout keeps them beside `zoo/`; a built wheel carries copies as the packages `zoo.recipes`
and `zoo.model_cards` (see `[tool.setuptools.package-dir]` in pyproject.toml).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def asset_dir(kind: str) -> Traversable:
    """The `recipes` or `model_cards` folder of this checkout, else of the installed package."""
    if kind not in ("recipes", "model_cards"):
        raise ValueError(f"kind must be 'recipes' or 'model_cards', got {kind!r}")
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / kind).is_dir():
        return _CHECKOUT / kind
    return resources.files(f"zoo.{kind}")
