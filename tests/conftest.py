"""Shared fixtures. Tests run on CPU with tiny configs, offline, each in its own temp dir."""

from __future__ import annotations

import os

import pytest
import torch

# Tests must never reach the network; loading code is exercised on folders the tests write.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One share of the cores per pytest-xdist worker: oversubscribed OpenMP threads spin against each
# other and made single tests 25 times slower under `pytest -n 2`.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _one_bigmem_test_at_a_time(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Tests marked `bigmem` (a full-size network with real weights: 11-13 GB each) hold a lock that all
    pytest-xdist workers share, so two never run at once on a 24 GB machine."""
    if request.node.get_closest_marker("bigmem") is None:
        yield
        return
    import fcntl

    # The workers' temp dirs share a parent, so the lock file there is one file for the whole run.
    lock_path = tmp_path_factory.getbasetemp().parent / "bigmem.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty Hugging Face cache, so no test sees another's (or the user's) files."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0


# A small real VideoUpscaler registered as hub name "toy", for testing the hub machinery on its own.

def _toy_classes():
    import dataclasses

    import torch.nn.functional as F
    from torch import nn

    from zoo.components.train.module import ZooModule
    from zoo.components.upscaler import VideoUpscaler

    @dataclasses.dataclass
    class ToyConfig:
        channels: int = 4
        kernel: tuple[int, int] = (3, 3)

        @classmethod
        def tiny(cls) -> ToyConfig:
            return cls()

        @classmethod
        def full(cls) -> ToyConfig:
            return cls(channels=16)

    class ToyUpscaler(VideoUpscaler):
        hub_name = "toy"
        config_class = ToyConfig
        scale = 2

        def __init__(self, config: ToyConfig) -> None:
            super().__init__(config)
            self.body = nn.Sequential(nn.Conv2d(3, config.channels, config.kernel, padding=1), nn.ReLU(),
                                      nn.Conv2d(config.channels, 3, config.kernel, padding=1))

        def stream(self, frames):
            for frame in frames:
                up = F.interpolate(frame[None], scale_factor=self.scale, mode="bilinear", align_corners=False)
                yield (up + self.body(up))[0].clamp(0, 1)

    class ToyModule(ZooModule):
        hub_name = "toy"

        def __init__(self, channels: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = ToyUpscaler(ToyConfig(channels=channels))

        def training_step(self, batch, batch_idx):
            lr, hr = batch
            return F.mse_loss(torch.stack(list(self.net.stream(lr.unbind(0)))), hr)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def to_upscaler(self) -> ToyUpscaler:
            return self.net

    return ToyConfig, ToyUpscaler, ToyModule


TOY_CARD = """---
license: apache-2.0
library_name: vsr-zoo
tags: [video-super-resolution]
base_model: org/base
pipeline_tag: video-to-video
datasets: [REDS]
metrics: [psnr]
---
# Toy `{{ name }}` at {{ repo_id }}
## Model Details
## Uses
## Bias, Risks, and Limitations
## How to Get Started with the Model
## Training Details
## Evaluation
## Citation
"""


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Register the hub name "toy" (a 2x conv upscaler, its LightningModule and its card)."""
    import sys
    import types

    import zoo.hub as hub

    config_cls, upscaler_cls, module_cls = _toy_classes()
    module = types.ModuleType("zoo_test_toy")
    module.ToyConfig, module.ToyUpscaler, module.ToyModule = config_cls, upscaler_cls, module_cls
    monkeypatch.setitem(sys.modules, "zoo_test_toy", module)
    cards = tmp_path_factory.mktemp("cards")
    (cards / "toy.md").write_text(TOY_CARD)
    monkeypatch.setattr(hub, "asset_dir", lambda kind: cards)
    cfg = hub.PretrainedCfg(paper="Toy", paradigm="conv", upscaler="zoo_test_toy:ToyUpscaler",
                            module="zoo_test_toy:ToyModule", recipe="recipes/toy.yaml", repo_id=None)
    monkeypatch.setitem(hub.REGISTRY, "toy", cfg)
    return module


def write_hub_cache(folder, repo_id: str, revision: str = "main", commit: str = "0" * 40):
    """Place `folder`'s files in the Hugging Face cache as a snapshot of `repo_id`, so that
    `snapshot_download(repo_id)` finds them with HF_HUB_OFFLINE=1 exactly as after a download."""
    import shutil
    from pathlib import Path

    import huggingface_hub.constants as constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    return snapshot


@pytest.fixture
def hub_cache():
    """`write_hub_cache(folder, repo_id)`: a tiny Hub-format repo in this test's private cache."""
    return write_hub_cache
