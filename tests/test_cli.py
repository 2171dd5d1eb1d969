"""The `lightning` and `zoo` commands: help, dispatch, one-line errors, packaged recipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zoo import cli

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("argv", [
    ["lightning", "--help"],
    ["lightning", "fit", "--help"],
    ["zoo", "--help"],
    ["zoo", "hub", "--help"],
    ["zoo", "upscale", "--help"],
    ["zoo", "bench", "--help"],
    ["zoo", "hub", "list"],
])
def test_commands_exit_zero(argv):
    result = run(str(BIN / argv[0]), *argv[1:])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_python_m_zoo_is_zoo_and_trains_like_lightning():
    assert run(sys.executable, "-m", "zoo", "--help").returncode == 0
    fit_help = run(sys.executable, "-m", "zoo", "fit", "--help")
    assert fit_help.returncode == 0, fit_help.stderr
    assert "--trainer" in fit_help.stdout and "--model" in fit_help.stdout


def test_hub_list_names_every_model(capsys):
    cli.zoo_main(["hub", "list"])
    out = capsys.readouterr().out
    for name in ("osdiffvsr", "stream_diffvsr", "osdenhancer", "pssr", "Jamichsu/Stream-DiffVSR"):
        assert name in out


def test_hub_card_prints_rendered_card(capsys):
    cli.zoo_main(["hub", "card", "osdenhancer"])
    out = capsys.readouterr().out
    assert out.startswith("---\n") and "library_name: vsr-zoo" in out and "{{" not in out


def test_user_errors_are_one_line_and_exit_one(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["hub", "download", "osdiffvsr"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: no pretrained OS-DiffVSR weights") and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["hub", "export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    assert info.value.code == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["transmogrify"])
    assert info.value.code == 2


def test_bench_lists_and_rejects_unknown(capsys):
    cli.zoo_main(["bench"])
    with pytest.raises(SystemExit) as info:
        cli.zoo_main(["bench", "no-such-benchmark"])
    assert info.value.code == 1
    assert "unknown benchmark 'no-such-benchmark'" in capsys.readouterr().err


def test_recipe_paths_fall_back_to_the_packaged_copy(tmp_path, monkeypatch):
    recipes = tmp_path / "pkg_recipes"
    (recipes / "tiny").mkdir(parents=True)
    (recipes / "tiny" / "x.yaml").write_text("trainer: {}\n")
    monkeypatch.setattr(cli, "asset_dir", lambda kind: recipes)
    monkeypatch.chdir(tmp_path)
    assert cli.packaged_recipe("recipes/tiny/x.yaml") == str(recipes / "tiny" / "x.yaml")
    assert cli.packaged_recipe("recipes/none.yaml") == "recipes/none.yaml"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "own.yaml").write_text("trainer: {}\n")
    assert cli.packaged_recipe("recipes/own.yaml") == "recipes/own.yaml"
    args = cli._with_packaged_recipes(["fit", "-c", "recipes/tiny/x.yaml", "--config=recipes/tiny/x.yaml"])
    assert args == ["fit", "-c", str(recipes / "tiny" / "x.yaml"), f"--config={recipes / 'tiny' / 'x.yaml'}"]
