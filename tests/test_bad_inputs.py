"""Bad input at the API and recipe entry points: one sentence naming the path or argument, a specific
exception type from the API, exit code 2 from the command line, never a traceback or a partial output.

(Frames that are NaN, infinite, out of range or of the wrong rank or channel count are checked for every
registered model in tests/test_contract.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo.hub as hub

REPO = Path(__file__).resolve().parents[1]


def _exported(toy_module, folder: Path) -> Path:
    return hub.export(hub.load("toy", pretrained=False, variant="tiny"), folder)


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    (folder / "SHA256SUMS").unlink()  # the reader itself must notice


def _drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "SHA256SUMS").unlink()


def _unknown_config_key(folder: Path) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["colour"] = "red"
    (folder / "config.json").write_text(json.dumps(meta))
    (folder / "SHA256SUMS").unlink()


def _other_model(folder: Path) -> None:
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "hub_name": "stream_diffvsr"}))
    (folder / "SHA256SUMS").unlink()


def _not_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")
    (folder / "SHA256SUMS").unlink()


@pytest.mark.parametrize(("damage", "error", "message"), [
    (_truncate, ValueError, r"model\.safetensors is not a readable safetensors file"),
    (_drop_weights, FileNotFoundError, r"model\.safetensors is missing"),
    (_unknown_config_key, ValueError, r"ToyConfig has no field\(s\) colour"),
    (_other_model, ValueError, r"holds weights for 'stream_diffvsr', not 'toy'"),
    (_not_json, ValueError, r"config\.json is not valid JSON"),
])
def test_damaged_weight_folders(toy, tmp_path, damage, error, message) -> None:
    folder = _exported(toy, tmp_path / "w")
    damage(folder)
    with pytest.raises(error, match=message):
        hub.load("toy", weights=folder)


def test_offline_with_nothing_cached_names_the_repo_and_the_way_out(toy) -> None:
    with pytest.raises(hub.WeightsUnavailableError, match=r"'org/absent'.*HF_HUB_OFFLINE=1.*weights=PATH"):
        hub.load("toy", weights="org/absent")


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("--trainer.max_stepz", "3", "unrecognized arguments: --trainer.max_stepz"),
    ("--data.init_args.train_roots", "[/no/such/root]", "dataset root /no/such/root does not exist"),
])
def test_recipe_mistakes_exit_2_with_one_sentence(tmp_path, argument, value, message) -> None:
    result = subprocess.run([sys.executable, "-m", "zoo", "fit", "-c", "recipes/tiny/stream.yaml", argument, value],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "lightning_logs").exists()


def test_the_lightning_command_without_the_train_extra_says_how_to_get_it(monkeypatch, capsys) -> None:
    import builtins

    from zoo.cli import lightning_main

    real_import = builtins.__import__

    def no_lightning(name, *args, **kwargs):
        if name.startswith("lightning"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lightning)
    with pytest.raises(SystemExit, match=r"pip install 'vsr-zoo\[train\]'"):
        lightning_main(["fit", "-c", "recipes/tiny/stream.yaml"])


def test_frames_of_the_wrong_kind_are_refused_before_any_network_runs(toy) -> None:
    upscaler = hub.load("toy", pretrained=False, variant="tiny")
    for frames, message in [(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "floats"),
                            (torch.rand(0, 3, 4, 4), "at least one frame"),
                            ([torch.rand(3, 4, 4)], "got list")]:
        with pytest.raises(ValueError, match=message):
            upscaler(frames)
