"""pyproject.toml: every package ships, and the base install declares what inference imports."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_under_zoo_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "zoo").rglob("__init__.py")}
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to [tool.setuptools] packages"


def test_hubconf_dependencies_are_base_dependencies() -> None:
    import re

    base = {re.split(r"[<>=\[ ]", d)[0].replace("-", "_").lower() for d in _pyproject()["project"]["dependencies"]}
    namespace: dict = {}
    hubconf = (REPO / "hubconf.py").read_text()
    exec(hubconf[hubconf.index("dependencies"):hubconf.index("\n", hubconf.index("dependencies"))], namespace)
    assert set(namespace["dependencies"]) <= base
    # The training stack is an extra, never a base requirement of inference.
    assert not base & {"lightning", "torchmetrics", "pyiqa", "timm", "kornia"}
