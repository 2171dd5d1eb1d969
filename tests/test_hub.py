"""zoo.hub: registry, loading from folders and the (offline) Hub cache, export, cards."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
import zoo.hub as hub


def test_registry_names_and_official_repos():
    assert hub.list_models()[:2] == ["osdiffvsr", "stream_diffvsr"]
    assert hub.REGISTRY["stream_diffvsr"].repo_id == "Jamichsu/Stream-DiffVSR"
    assert hub.REGISTRY["osdiffvsr"].repo_id is None
    for cfg in hub.REGISTRY.values():
        assert cfg.base_models and cfg.license == "apache-2.0"
        assert cfg.upscaler.count(":") == 1 and cfg.module.count(":") == 1


def test_unknown_name_lists_the_known_ones():
    names = "osdiffvsr, stream_diffvsr, osdenhancer, pssr"
    with pytest.raises(ValueError, match=rf"unknown model 'nope'; choose one of {names}$"):
        zoo.load("nope")


def test_a_missing_module_inside_a_paper_is_not_disguised(monkeypatch):
    # A registered entry whose code fails to import is a bug: the import error reaches the caller as is.
    cfg = hub.PretrainedCfg(paper="Broken-VSR", paradigm="", upscaler="zoo.broken_vsr.pipeline:X",
                            module="zoo.broken_vsr.module:Y", recipe="recipes/broken.yaml", repo_id=None)
    monkeypatch.setitem(hub.REGISTRY, "broken", cfg)
    with pytest.raises(ModuleNotFoundError, match=r"zoo\.broken_vsr"):
        hub.load("broken", pretrained=False)


def test_every_registered_entry_has_its_recipes_and_card():
    from zoo.assets import asset_dir

    for name, cfg in hub.REGISTRY.items():
        assert asset_dir("recipes").joinpath(cfg.recipe.removeprefix("recipes/")).is_file(), cfg.recipe
        assert asset_dir("recipes").joinpath("tiny", cfg.recipe.removeprefix("recipes/")).is_file(), name
        assert asset_dir("model_cards").joinpath(f"{name}.md").is_file(), name


def test_random_init_variants(toy):
    tiny = hub.load("toy", pretrained=False, variant="tiny")
    full = hub.load("toy", pretrained=False, variant="full")
    assert isinstance(tiny, toy.ToyUpscaler) and not tiny.training
    assert tiny.body[0].out_channels == 4 and full.body[0].out_channels == 16
    with pytest.raises(ValueError, match="variant must be 'tiny' or 'full', got 'huge'"):
        hub.load("toy", pretrained=False, variant="huge")


def test_unpublished_weights_name_the_recipe(toy):
    expected = r"no pretrained Toy weights .* `lightning fit -c recipes/toy.yaml`"
    with pytest.raises(hub.WeightsUnavailableError, match=expected):
        hub.load("toy")


def test_export_folder_round_trip(toy, tmp_path):
    model = hub.load("toy", pretrained=False, variant="tiny")
    folder = hub.export(model, tmp_path / "export", repo_id="org/toy")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "SHA256SUMS", "config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == {
        "hub_name": "toy", "config": {"channels": 4, "kernel": [3, 3]}}
    assert "Toy `toy` at org/toy" in (folder / "README.md").read_text()
    loaded = hub.load("toy", weights=folder)
    assert loaded.config == model.config  # tuples come back as tuples
    frames = torch.rand(2, 3, 8, 12)
    assert torch.equal(loaded(frames), model(frames))


@pytest.mark.parametrize("name", [*hub.list_models(), "toy"])
def test_exported_files_get_the_usual_permissions(request, tmp_path, name):
    import os
    import stat

    if name == "toy":
        request.getfixturevalue("toy")
    umask = os.umask(0o022)
    try:
        folder = hub.export(hub.load(name, pretrained=False, variant="tiny", merge_lora=False), tmp_path / "export")
    finally:
        os.umask(umask)
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o644}, modes  # safetensors alone would leave its files at 0600


def test_load_from_offline_hub_cache(toy, tmp_path, hub_cache):
    model = hub.load("toy", pretrained=False, variant="full")
    hub_cache(hub.export(model, tmp_path / "export"), "org/toy")
    frames = torch.rand(1, 3, 8, 8)
    assert torch.equal(hub.load("toy", weights="org/toy")(frames), model(frames))


def test_pretrained_from_registry_checks_sha256(toy, tmp_path, hub_cache, monkeypatch):
    import dataclasses
    import hashlib

    model = hub.load("toy", pretrained=False, variant="full")
    snapshot = hub_cache(hub.export(model, tmp_path / "export"), "org/toy-weights")
    digest = hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()
    cfg = dataclasses.replace(hub.REGISTRY["toy"], repo_id="org/toy-weights", sha256={"model.safetensors": digest})
    monkeypatch.setitem(hub.REGISTRY, "toy", cfg)
    frames = torch.rand(1, 3, 8, 8)
    assert torch.equal(hub.load("toy")(frames), model(frames))
    bad = dataclasses.replace(cfg, sha256={"model.safetensors": "0" * 64})
    monkeypatch.setitem(hub.REGISTRY, "toy", bad)
    expected = r"model\.safetensors is damaged or was changed: .*, expected 0000"
    with pytest.raises(hub.WeightsIntegrityError, match=expected):
        hub.load("toy")


def test_a_flipped_byte_in_an_exported_folder_is_refused_by_name(toy, tmp_path):
    folder = hub.export(hub.load("toy", pretrained=False, variant="tiny"), tmp_path / "export")
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["config.json", "model.safetensors"]
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a byte of a tensor: the file still parses, only the digest tells
    weights.write_bytes(bytes(data))
    with pytest.raises(hub.WeightsIntegrityError, match=r"model\.safetensors is damaged or was changed"):
        hub.load("toy", weights=folder)
    (folder / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(hub.WeightsIntegrityError, match="SHA256SUMS line 1"):
        hub.load("toy", weights=folder)


def test_missing_download_offline_is_one_clear_sentence(toy):
    with pytest.raises(hub.WeightsUnavailableError) as info:
        hub.load("toy", weights="org/not-cached")
    message = str(info.value)
    assert "'org/not-cached'" in message and "HF_HUB_OFFLINE" in message and "weights=PATH" in message
    assert "\n" not in message


def test_weights_that_are_neither_folder_nor_repo(toy, tmp_path):
    with pytest.raises(hub.WeightsUnavailableError, match="neither a folder nor a Hub repo id"):
        hub.load("toy", weights=str(tmp_path / "a" / "b" / "c"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(hub.WeightsUnavailableError, match="neither a folder nor a Hub repo id"):
        hub.load("toy", weights=tmp_path / "file.bin")


def test_folder_for_another_model_is_rejected(toy, tmp_path):
    folder = hub.load("toy", pretrained=False, variant="tiny").save_pretrained(tmp_path / "w")
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "hub_name": "stream_diffvsr"}))
    with pytest.raises(ValueError, match="holds weights for 'stream_diffvsr', not 'toy'"):
        hub.load("toy", weights=folder)
    (folder / "config.json").write_text(json.dumps(meta))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        hub.load("toy", weights=folder)


def test_export_lightning_checkpoint(toy, tmp_path):
    import lightning.pytorch as pl

    module = toy.ToyModule(channels=3)
    lr, hr = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 16, 16)
    loader = torch.utils.data.DataLoader(list(zip(lr, hr)), batch_size=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, loader)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    folder = hub.export_checkpoint(ckpt, tmp_path / "hub")
    loaded = hub.load("toy", weights=folder)
    assert loaded.config.channels == 3
    assert torch.equal(loaded(lr), module.eval().to_upscaler()(lr))


def test_export_rejects_foreign_or_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.export_checkpoint(tmp_path / "none.ckpt", tmp_path / "out")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not written by a vsr-zoo LightningModule"):
        hub.export_checkpoint(tmp_path / "plain.ckpt", tmp_path / "out")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable Lightning checkpoint"):
        hub.export_checkpoint(tmp_path / "junk.ckpt", tmp_path / "out")


@pytest.mark.parametrize("name", hub.list_models())
def test_every_model_card_renders_and_validates(name):
    card = hub.render_card(name)
    hub.validate_card(card)
    data = card.data.to_dict()
    expected = list(hub.REGISTRY[name].base_models)
    assert (data["base_model"] if isinstance(data["base_model"], list) else [data["base_model"]]) == expected
    assert data["license"] == hub.REGISTRY[name].license
    assert "{{" not in card.text and "}}" not in card.text


def test_validate_card_rejects_bad_metadata_and_order():
    from huggingface_hub import ModelCard

    good = str(hub.render_card("osdiffvsr"))
    hub.validate_card(ModelCard(good))
    without_metrics = ModelCard(good.replace("metrics:\n", "unused:\n", 1))
    with pytest.raises(ValueError, match="metadata lacks metrics"):
        hub.validate_card(without_metrics)
    swapped = good.replace("## Uses", "## TEMP").replace("## Evaluation", "## Uses").replace("## TEMP", "## Evaluation")
    with pytest.raises(ValueError, match="sections must follow the order"):
        hub.validate_card(ModelCard(swapped))
    with pytest.raises(ValueError, match="lacks the section '## Citation'"):
        hub.validate_card(ModelCard(good.replace("## Citation", "## References")))
    with pytest.raises(ValueError, match="library_name must be 'vsr-zoo'"):
        hub.validate_card(ModelCard(good.replace("library_name: vsr-zoo", "library_name: diffusers")))
