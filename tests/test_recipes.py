"""Every registered paper's tiny recipe, through the `lightning` console command as the README runs it:

- it trains under Lightning's DDP strategy on two CPU processes (every stage, every trainable parameter
  receiving a gradient: DistributedDataParallel fails on one that does not);
- killed with SIGKILL mid-stage and mid-epoch, then resumed with `--ckpt_path last`, it goes on exactly as
  a run never interrupted: the same stage, trainable set, optimizer and LR-scheduler state, clips in the
  same order, the same loss at every step, and the same weights and optimizer state at the end.

Both run on CPU with one thread per process: the same kernels on the same inputs give bit-identical
results, so the comparison is exact.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from zoo.cli import lightning_main
from zoo.hub import REGISTRY

REPO = Path(__file__).parents[1]
LIGHTNING = str(Path(sys.executable).parent / "lightning")
NAMES = sorted(REGISTRY)


def tiny_recipe(name: str) -> Path:
    return REPO / "recipes" / "tiny" / Path(REGISTRY[name].recipe).name


def subprocess_env() -> dict[str, str]:
    # tests/ for step_trace; one thread per process, as the in-process runs use.
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def last_checkpoint(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def stage_state(state: dict[str, Any]) -> dict[str, Any]:
    """The StageSchedule's saved state (index and name of the active stage)."""
    (stages,) = [value for key, value in state["callbacks"].items() if "Stages" in key]
    return stages


# Paper-specific checks of a DDP run's folder (version_0): what the papers' own DDP tests asserted.

def _osdenhancer_losses_per_stage(run: Path, output: str) -> None:
    expected = {
        0.0: {"train/reconstruction", "train/perceptual", "train/pixel_residual"},
        1.0: {"train/latent_mse"},
        2.0: {"train/latent_mse", "train/latent_residual"},
        3.0: {"train/l1", "train/dists", "train/warp"},
    }
    logged: dict[float, set[str]] = {}
    with (run / "metrics.csv").open() as file:
        for row in csv.DictReader(file):
            if row["stage"]:
                names = {k for k, v in row.items() if k.startswith("train/") and k != "train/loss" and v}
                logged.setdefault(float(row["stage"]), set()).update(names)
    assert logged == expected


def _pssr_draft_initialised(run: Path, output: str) -> None:
    assert "stage 3/3 'draft'" in output
    assert last_checkpoint(run)["state_dict"]["draft_initialised"]


DDP_CHECKS: dict[str, Callable[[Path, str], None]] = {
    "osdenhancer": _osdenhancer_losses_per_stage,
    "pssr": _pssr_draft_initialised,
}


@pytest.mark.parametrize("name", NAMES)
def test_tiny_recipe_trains_under_ddp_on_two_cpu_processes(name: str, tmp_path: Path) -> None:
    # DDP starts one process per device by re-running the command, so it runs as the console script.
    recipe = tiny_recipe(name)
    result = subprocess.run(
        [LIGHTNING, "fit", "-c", str(recipe), "--trainer.strategy", "ddp", "--trainer.devices", "2",
         "--trainer.accelerator", "cpu"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    state = last_checkpoint(run)
    assert state["global_step"] == yaml.safe_load(recipe.read_text())["trainer"]["max_steps"]
    with (run / "metrics.csv").open() as file:
        logged = {int(float(row["stage"])) for row in csv.DictReader(file) if row["stage"]}
    assert logged == set(range(stage_state(state)["index"] + 1))  # every stage up to the last one trained
    # Each process's random state is checkpointed, for an exact resume under DDP too.
    (random_state,) = [v for k, v in state["callbacks"].items() if "TrainingRandomState" in k]
    assert len(random_state["processes"]) == 2
    DDP_CHECKS.get(name, lambda run, output: None)(run, result.stdout + result.stderr)


# Resume after SIGKILL ------------------------------------------------------------------------------


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def trace_callback(path: Path, hold_at: int | None = None) -> str:
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": "step_trace.StepTrace", "init_args": {"path": str(path), "hold_at": hold_at}})


def fit_here(folder: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """`lightning fit ARGS` in this process (saving the interpreter's start-up), from `folder`."""
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    with one_thread():
        lightning_main(["fit", *args])


def read_trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def kill_point(trace: list[dict[str, Any]]) -> int:
    """Index of the step to kill the run before: mid-stage and mid-epoch (the step before it is of the same
    stage and epoch), preferably in a stage that is neither the first nor the last, so the resumed run has
    switched stages before and switches again after; the middle one of the candidates."""
    candidates = [i for i in range(1, len(trace))
                  if (trace[i - 1]["stage"], trace[i - 1]["epoch"]) == (trace[i]["stage"], trace[i]["epoch"])]
    stages = list(dict.fromkeys(record["stage"] for record in trace))
    inner = [i for i in candidates if trace[i]["stage"] not in (stages[0], stages[-1])]
    chosen = inner or candidates
    assert chosen, "the tiny recipe has no step inside a stage to kill the run at"
    return chosen[len(chosen) // 2]


def kill_when_held(command: list[str], cwd: Path, held: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `command` until StepTrace holds it, then SIGKILL it."""
    cwd.mkdir()
    with subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        deadline = time.monotonic() + timeout
        while not held.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if held.exists():
            os.kill(process.pid, signal.SIGKILL)
        else:
            process.kill()
        output, _ = process.communicate()
    assert held.exists(), output[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, output)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal nested checkpoint content, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", NAMES)
def test_a_run_killed_mid_stage_resumes_as_if_never_interrupted(name: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = str(tiny_recipe(name))
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything exports it

    fit_here(tmp_path / "whole", monkeypatch, "-c", recipe, trace_callback(tmp_path / "whole.jsonl"))
    whole = read_trace(tmp_path / "whole.jsonl")
    kill = kill_point(whole)
    step = whole[kill]["step"]

    killed = tmp_path / "killed"
    result = kill_when_held([LIGHTNING, "fit", "-c", recipe, trace_callback(tmp_path / "killed.jsonl", step)],
                            killed, tmp_path / "killed.held")
    assert result.returncode == -signal.SIGKILL
    assert last_checkpoint(killed / "lightning_logs" / "version_0")["global_step"] == step
    fit_here(killed, monkeypatch, "-c", recipe, "--ckpt_path", "last", trace_callback(tmp_path / "resumed.jsonl"))

    before, after = read_trace(tmp_path / "killed.jsonl"), read_trace(tmp_path / "resumed.jsonl")
    assert before == whole[:kill]
    assert after[0]["step"] == step and after[0]["stage"] == whole[kill - 1]["stage"]  # resumed mid-stage
    # Step for step: stage, trainable set, optimizer and scheduler state, clips, loss.
    for resumed, uninterrupted in zip(after, whole[kill:], strict=True):
        assert resumed == uninterrupted, f"step {uninterrupted['step']}"

    end, resumed_end = last_checkpoint(tmp_path / "whole" / "lightning_logs" / "version_0"), last_checkpoint(
        killed / "lightning_logs" / "version_1")
    for key in ("global_step", "state_dict", "optimizer_states", "lr_schedulers"):
        assert_same(end[key], resumed_end[key], key)
    assert stage_state(end) == stage_state(resumed_end)
