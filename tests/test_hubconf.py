"""hubconf.py: torch.hub lists exactly the registry's entries, with docstrings, keyword-only arguments.

torch.hub.list/help take `source="local"` only in some torch releases (2.15 reads GitHub only), so
the listing is also checked with torch.hub's own rule on the module torch.hub imports.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import zoo.hub as hub

REPO = Path(__file__).resolve().parents[1]


def hubconf_module():
    return torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))


def test_hub_list_is_the_registry():
    module = hubconf_module()
    # torch.hub.list's rule: every callable whose name does not start with "_".
    entries = sorted(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_"))
    assert entries == sorted(hub.list_models())
    if "source" in inspect.signature(torch.hub.list).parameters:
        assert sorted(torch.hub.list(str(REPO), source="local", trust_repo=True)) == entries


@pytest.mark.parametrize("name", hub.list_models())
def test_entrypoint_docstring_and_signature(name):
    entry = getattr(hubconf_module(), name)
    doc = entry.__doc__
    assert doc and "\n" not in doc.strip() and hub.REGISTRY[name].paper in doc
    if "source" in inspect.signature(torch.hub.help).parameters:
        assert torch.hub.help(str(REPO), name, source="local", trust_repo=True) == doc
    params = inspect.signature(entry).parameters
    assert list(params) == ["pretrained", "variant", "weights", "device", "dtype"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


def test_entrypoints_delegate_to_hub_load(monkeypatch):
    module = hubconf_module()
    calls = []
    monkeypatch.setattr(module, "_load", lambda name, **kw: calls.append((name, kw)) or name)
    for name in hub.list_models():
        assert getattr(module, name)(pretrained=False, variant="tiny") == name
    assert [c[0] for c in calls] == hub.list_models()
    assert calls[0][1] == {"pretrained": False, "variant": "tiny", "weights": None, "device": None, "dtype": None}


def test_torch_hub_load_local_reaches_the_registry():
    with pytest.raises(ValueError, match="variant must be 'tiny' or 'full'"):
        torch.hub.load(str(REPO), "stream_diffvsr", source="local",
                       pretrained=False, variant="bogus")
