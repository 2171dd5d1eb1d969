"""zoo evaluate: paired folders scored independently, seeded degradation, one table per run, figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
import zoo.hub
from zoo.components.samples import sample_clips
from zoo.components.video_io import write_video
from zoo.evaluate import evaluate

CLIPS = ("astronaut_pan", "coffee_zoom")


def _y(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma of uint8 RGB `(..., 3)` frames on the 0-255 scale (MATLAB rgb2ycbcr)."""
    return 16 + (65.481 * frames[..., 0] + 128.553 * frames[..., 1] + 24.966 * frames[..., 2]) / 255


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gt/<clip>/ and lr/<clip>/ PNG folders: 3 frames of 48x64 ground truth, bicubic x4 LR."""
    root = tmp_path_factory.mktemp("bench")
    for clip in sample_clips(num_frames=3, size=(48, 64), names=CLIPS):
        lr = F.interpolate(clip.frames, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
        write_video(root / "gt" / clip.name, clip.frames, fps=8)
        write_video(root / "lr" / clip.name, lr, fps=8)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for name in ("stream_diffvsr", "osdiffvsr"):
        torch.manual_seed(0)
        folders[name] = zoo.hub.export(zoo.load(name, pretrained=False, variant="tiny", merge_lora=False),
                                       tmp_path_factory.mktemp(name))
    return folders


def test_two_models_one_table_psnr_matches_an_independent_computation(paired, exported, tmp_path) -> None:
    models = list(exported)
    result = evaluate(models, paired, layout="pairs", weights=[str(exported[m]) for m in models],
                      metrics=("psnr", "ssim"), out=tmp_path / "report", progress=False)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| metric | stream_diffvsr | osdiffvsr |" in report
    assert report.count("| psnr ↑ |") == 1 and report.count("| ssim ↑ |") == 1

    # PSNR on Y of the saved frames, recomputed here with numpy from the model's own output.
    upscaler = zoo.load("stream_diffvsr", weights=exported["stream_diffvsr"])
    lr = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 255
                      for p in sorted((paired / "lr" / CLIPS[0]).iterdir())])
    pred = upscaler(lr).permute(0, 2, 3, 1).double().numpy()
    gt = np.stack([np.array(Image.open(p)) for p in sorted((paired / "gt" / CLIPS[0]).iterdir())]).astype(np.float64)
    y_pred, y_gt = _y(pred * 255), _y(gt)
    expected = np.mean([10 * np.log10(255**2 / np.mean((a - b) ** 2)) for a, b in zip(y_pred, y_gt)])
    per_clip = result["models"]["stream_diffvsr"]["per_clip"]
    assert per_clip[0]["key"] == f"{CLIPS[0]}/00000000"
    assert per_clip[0]["psnr"] == pytest.approx(expected, abs=1e-6)

    data = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(data["models"]) == {"stream_diffvsr", "osdiffvsr"}
    assert (tmp_path / "report" / "metrics.csv").read_text().count("\n") == 2 * (len(CLIPS) + 1) + 1
    for name in ("metrics.png", "profile_0.png", "crops_0.png", "profile_1.png"):
        image = np.array(Image.open(tmp_path / "report" / name).convert("L"))
        assert image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 1, name
        assert f"]({name})" in report


def test_degraded_ground_truth_is_the_same_in_every_run(paired, exported, tmp_path) -> None:
    runs = [
        evaluate(["osdiffvsr"], paired / "gt", layout="gt", degradation="blurdown", seed=3,
                 weights=[str(exported["osdiffvsr"])], metrics=("psnr",), out=tmp_path / f"run{i}", progress=False)
        for i in range(2)
    ]
    first, second = (run["models"]["osdiffvsr"]["per_clip"] for run in runs)
    assert [c["psnr"] for c in first] == [c["psnr"] for c in second]
    other = evaluate(["osdiffvsr"], paired / "gt", layout="gt", degradation="realbasicvsr", seed=3,
                     weights=[str(exported["osdiffvsr"])], metrics=("psnr",), out=tmp_path / "other", progress=False)
    assert other["models"]["osdiffvsr"]["per_clip"][0]["psnr"] != first[0]["psnr"]


def test_unavailable_metrics_are_reported_not_zero(paired, exported, tmp_path) -> None:
    result = evaluate(["osdiffvsr"], paired, weights=[str(exported["osdiffvsr"])], metrics=("psnr", "lpips"),
                      out=tmp_path / "r", progress=False)
    scores = result["models"]["osdiffvsr"]
    assert "lpips" not in scores["overall"] and "LPIPS" in scores["unavailable"]["lpips"]
    assert "## Unavailable metrics" in (tmp_path / "r" / "report.md").read_text()


def test_cli_runs_and_bad_arguments_are_one_sentence(paired, exported, tmp_path, capsys) -> None:
    from zoo.cli import zoo_main

    zoo_main(["evaluate", "--model", "osdiffvsr", "--weights", str(exported["osdiffvsr"]), "--dataset", str(paired),
              "--metrics", "psnr", "--out", str(tmp_path / "cli"), "--quiet"])
    assert capsys.readouterr().out.strip().endswith("report.md")
    with pytest.raises(SystemExit):
        zoo_main(["evaluate", "--model", "osdiffvsr", "--dataset", str(paired), "--metrics", "psnr,sharpness"])
    assert "unknown metric(s) sharpness" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        zoo_main(["evaluate", "--model", "osdiffvsr", "--random-weights", "--variant", "tiny", "--dataset",
                  str(paired / "gt"), "--layout", "gt", "--metrics", "psnr"])
    assert "holds ground truth only: name a degradation" in capsys.readouterr().err


def test_lightning_test_loop_of_a_zoo_module_reports_the_same_metrics(toy, paired) -> None:
    from lightning.pytorch import Trainer

    from zoo.components.train.evaluation import EvaluationDataModule

    module = toy.ToyModule()
    module.test_metrics = ("psnr",)
    data = EvaluationDataModule(str(paired), layout="pairs", scale=4)
    with pytest.raises(ValueError, match="the LR must be 1/2 of the ground truth"):
        Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").test(module, datamodule=data,
                                                                                  verbose=False)
    data = EvaluationDataModule(str(paired / "gt"), layout="gt", degradation="bicubic", scale=2)
    scores = Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").test(module, datamodule=data,
                                                                                       verbose=False)
    assert 5 < scores[0]["test/psnr"] < 60
