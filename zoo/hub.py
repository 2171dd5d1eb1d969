"""Weights registry, loading from the Hugging Face Hub or local folders, export, push and cards.

`REGISTRY` is the one place that says, for every hub name, which paper it is, where its weights
live and under which licence: an entry exists exactly when its paper is in this zoo. Downloads go
through `huggingface_hub`; weights are safetensors. This module never imports the training stack,
and importing it imports neither torch nor any model code, so listing, help and cards are quick.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.assets import asset_dir

if TYPE_CHECKING:
    import torch
    from huggingface_hub import ModelCard

    from zoo.components.upscaler import VideoUpscaler


@dataclass(frozen=True)
class PretrainedCfg:
    """Where a hub entry's code and weights live.

    Args:
        paper: the paper's short title.
        paradigm: one line on how the method upscales.
        upscaler: `module:Class` of the entry's `VideoUpscaler`.
        module: `module:Class` of the entry's LightningModule (used by `zoo hub export`).
        recipe: the full-size training recipe, relative to the checkout.
        repo_id: Hub repository with this entry's weights; None while none are published.
        revision: git revision of `repo_id` to pin.
        files: glob patterns of the files to download from `repo_id`.
        sha256: expected digests of downloaded files (path in repo -> hex digest), checked after
            download; files not listed are trusted to the pinned revision.
        license: SPDX id of the weights' licence.
        base_models: Hub ids of the published models the weights build on.
    """

    paper: str
    paradigm: str
    upscaler: str
    module: str
    recipe: str
    repo_id: str | None
    revision: str = "main"
    files: tuple[str, ...] = ("*.json", "*.safetensors", "*.md")
    sha256: dict[str, str] = field(default_factory=dict)
    license: str = "apache-2.0"
    base_models: tuple[str, ...] = ()


REGISTRY: dict[str, PretrainedCfg] = {
    "osdiffvsr": PretrainedCfg(
        paper="OS-DiffVSR",
        paradigm="one-step latent diffusion, 3-frame window with flow-warped fusion",
        upscaler="zoo.osdiffvsr.pipeline:OSDiffVSRUpscaler",
        module="zoo.osdiffvsr.module:OSDiffVSRModule",
        recipe="recipes/osdiffvsr.yaml",
        repo_id=None,
        base_models=("stabilityai/stable-diffusion-2-1-base",),
    ),
    "stream_diffvsr": PretrainedCfg(
        paper="Stream-DiffVSR",
        paradigm="causal streaming, 4-step distilled DDIM with auto-regressive temporal guidance",
        upscaler="zoo.stream_diffvsr.pipeline:StreamDiffVSRUpscaler",
        module="zoo.stream_diffvsr.module:StreamDiffVSRModule",
        recipe="recipes/stream.yaml",
        repo_id="Jamichsu/Stream-DiffVSR",
        files=("controlnet/*", "unet/*", "vae/*", "scheduler/*", "text_encoder/*", "tokenizer/*"),
        base_models=("stabilityai/stable-diffusion-x4-upscaler",),
    ),
    "osdenhancer": PretrainedCfg(
        paper="OSDEnhancer",
        paradigm="one-step space-time diffusion, temporal chunks of 8n+1 output frames",
        upscaler="zoo.osdenhancer.pipeline:OSDEnhancerUpscaler",
        module="zoo.osdenhancer.module:OSDEnhancerModule",
        recipe="recipes/osdenhancer.yaml",
        repo_id="W-Shuoyan/OSDEnhancer",
        files=("transformer/*", "vae/*", "scheduler/*", "prompt_embeddings/*"),
        base_models=("zai-org/CogVideoX1.5-5B",),
    ),
    "pssr": PretrainedCfg(
        paper="PS-SR",
        paradigm="pseudo-single-step: one Wan2.1 base step, then pruned-draft steps adding only high frequencies",
        upscaler="zoo.pssr.pipeline:PSSRUpscaler",
        module="zoo.pssr.module:PSSRModule",
        recipe="recipes/pssr.yaml",
        repo_id=None,
        base_models=("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",),
    ),
}

GITHUB_REPO = "vsr-zoo/vsr-zoo"
"""The zoo's code on GitHub, as `torch.hub.load(GITHUB_REPO, name)` takes it."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class WeightsUnavailableError(OSError):
    """Weights could not be found locally or downloaded."""


class MissingExtraError(ImportError):
    """A feature needs an optional extra (e.g. `train`) that is not installed."""


def require_train_extra(feature: str) -> None:
    """Raise `MissingExtraError` naming `feature` when Lightning (the train extra) is not installed."""
    import importlib.util

    if importlib.util.find_spec("lightning") is None:
        raise MissingExtraError(f"{feature} needs the train extra (lightning is not installed): "
                                f"pip install 'vsr-zoo[train]'")


class WeightsIntegrityError(ValueError):
    """A weights file differs from the digest recorded for it: damaged, truncated or changed."""


CHECKSUMS = "SHA256SUMS"
"""Written by `export` beside the weights: `<sha256>  <path>` per weight and config file (`sha256sum -c`
reads it); `load` checks a folder against it before reading any weight."""


def list_models() -> list[str]:
    """Every hub name, in registry order."""
    return list(REGISTRY)


def get_cfg(name: str) -> PretrainedCfg:
    """The registry entry of `name`; unknown names raise a `ValueError` listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(REGISTRY)}") from None


def import_object(path: str) -> Any:
    """Import `package.module:Attribute`."""
    module, _, attr = path.partition(":")
    return getattr(import_module(module), attr)


def upscaler_class(name: str) -> type[VideoUpscaler]:
    """The `VideoUpscaler` subclass registered as `name`."""
    return import_object(get_cfg(name).upscaler)


def resolve_weights(weights: str | os.PathLike, *, revision: str | None = None,
                    allow_patterns: tuple[str, ...] | None = None, local_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding `weights`: the folder itself, or a snapshot of the Hub repo it names.

    Args:
        weights: a local folder, or a Hub repo id (`org/name`).
        revision: git revision of the repo; the default branch when None.
        allow_patterns: restrict the download to these globs.
        local_dir: copy the snapshot into this folder instead of only the Hub cache.

    Raises:
        WeightsUnavailableError: neither a folder nor a downloadable repo (offline, missing, gated).
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        return path
    ref = str(weights)
    if not _REPO_ID.match(ref) or path.exists():
        raise WeightsUnavailableError(f"weights {ref!r} is neither a folder nor a Hub repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(ref, revision=revision, allow_patterns=list(allow_patterns or ()) or None,
                                   local_dir=local_dir)
    except LocalEntryNotFoundError:
        raise WeightsUnavailableError(
            f"{ref!r} is not in the Hugging Face cache and the Hub cannot be reached (no network, or "
            f"HF_HUB_OFFLINE=1); download it where a network is available, or pass a local folder with "
            f"weights=PATH"
        ) from None
    except HfHubHTTPError as err:
        # Missing, gated or private repos and revisions: the Hub's own first line says which.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsUnavailableError(f"the Hugging Face Hub refused {ref!r}: {reason}") from None
    return Path(folder)


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(folder: Path, digests: dict[str, str]) -> None:
    """Check the files in `folder` against `digests` (path in folder -> hex sha256).

    Raises:
        WeightsUnavailableError: a listed file is missing.
        WeightsIntegrityError: a file's digest differs, naming the file.
    """
    for rel, expected in digests.items():
        file = folder / rel
        if not file.is_file():
            raise WeightsUnavailableError(f"{file} is missing from the weights folder {folder}")
        actual = file_sha256(file)
        if actual != expected:
            raise WeightsIntegrityError(f"{file} is damaged or was changed: sha256 {actual}, expected {expected}")


def write_checksums(folder: Path) -> Path:
    """Record the sha256 of every weight and config file of an exported `folder` in `SHA256SUMS`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
    lines = [f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    path = folder / CHECKSUMS
    path.write_text("\n".join(lines) + "\n")
    return path


def verify_checksums(folder: Path) -> None:
    """Check `folder` against its `SHA256SUMS`, when it has one (exported folders do)."""
    path = folder / CHECKSUMS
    if not path.is_file():
        return
    digests = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel:
            raise WeightsIntegrityError(f"{path} line {number} is not '<sha256>  <path>': {line[:80]!r}")
        digests[rel] = digest
    verify_sha256(folder, digests)


def _unpublished(cfg: PretrainedCfg) -> str:
    return (f"no pretrained {cfg.paper} weights are published yet; train them with `lightning fit -c {cfg.recipe}`, "
            f"export with `zoo hub export CKPT DIR` and pass weights=DIR")


def load(name: str, *, pretrained: bool = True, variant: str = "full", weights: str | os.PathLike | None = None,
         device: str | torch.device | None = None, dtype: torch.dtype | None = None, merge_lora: bool = True,
         **options: Any) -> VideoUpscaler:
    """Build the `VideoUpscaler` registered as `name`, in eval mode, its LoRA merged and attention fused.

    Args:
        name: a hub name (`zoo.list_models()`).
        pretrained: load the registry's published weights (ignored when `weights` is given).
        variant: network size when built without weights: `"full"` (the paper's) or `"tiny"`.
        weights: a folder or Hub repo id holding weights exported by `zoo hub export` (or the
            paper's official layout where the paper publishes one).
        device: where to put the model.
        dtype: parameter dtype, e.g. `torch.bfloat16`.
        merge_lora: fold the LoRA adapters into the base weights (`VideoUpscaler.merge_lora`), in float32
            before the cast to `dtype`, then fuse attention projections (`VideoUpscaler.fuse_projections`).
            False keeps the weights as stored, for a model to export again.
        **options: the pipeline's runtime options (`VideoUpscaler.configure`: tiles, chunks, ...).
    """
    from zoo.components.upscaler import check_variant

    cfg = get_cfg(name)
    check_variant(variant)
    cls = upscaler_class(name)
    if weights is not None:
        folder = resolve_weights(weights)
        verify_checksums(folder)
        model = cls.from_pretrained(folder)
    elif pretrained:
        if cfg.repo_id is None:
            raise WeightsUnavailableError(_unpublished(cfg) + " (or pretrained=False for random weights)")
        if variant != "full":
            raise ValueError(f"published {cfg.paper} weights are full-size; use variant='full' or pretrained=False")
        folder = resolve_weights(cfg.repo_id, revision=cfg.revision, allow_patterns=cfg.files)
        verify_sha256(folder, cfg.sha256)
        model = cls.from_pretrained(folder)
    else:
        model = cls.from_variant(variant)
    if merge_lora:
        model.merge_lora()
        model.fuse_projections()
    return model.configure(**options).to(device=device, dtype=dtype).eval()


# Model cards ------------------------------------------------------------------------------

CARD_REQUIRED = ("license", "library_name", "tags", "base_model", "pipeline_tag", "datasets", "metrics")
CARD_SECTIONS = ("Model Details", "Uses", "Bias, Risks, and Limitations", "How to Get Started with the Model",
                 "Training Details", "Evaluation", "Citation")


def card_template(name: str) -> str:
    """The raw `model_cards/<name>.md` template (from the checkout or the installed package)."""
    get_cfg(name)
    return asset_dir("model_cards").joinpath(f"{name}.md").read_text()


def render_card(name: str, *, repo_id: str | None = None) -> ModelCard:
    """Render `model_cards/<name>.md` with `huggingface_hub.ModelCard` (Jinja2 variables filled).

    Args:
        name: the hub name.
        repo_id: the Hub repo the card describes; the registry's, else (an export not yet pushed)
            the exported folder, named as `weights=` takes it.
    """
    from huggingface_hub import ModelCard

    cfg = get_cfg(name)
    template = ModelCard(card_template(name))  # splits the YAML front matter from the body
    return ModelCard.from_template(
        template.data, template_str="---\n{{ card_data }}\n---\n" + template.text, name=name, cfg=cfg,
        repo_id=repo_id or cfg.repo_id or "path/to/exported", github=GITHUB_REPO,
    )


def validate_card(card: ModelCard) -> None:
    """Offline check of a card's metadata and section order; raises `ValueError` on the first problem."""
    data = card.data.to_dict()
    missing = [key for key in CARD_REQUIRED if not data.get(key)]
    if missing:
        raise ValueError(f"model card metadata lacks {', '.join(missing)}")
    if data["library_name"] != "vsr-zoo":
        raise ValueError(f"model card library_name must be 'vsr-zoo', got {data['library_name']!r}")
    for key in ("tags", "datasets", "metrics"):
        if not isinstance(data[key], list) or not all(isinstance(v, str) for v in data[key]):
            raise ValueError(f"model card {key} must be a list of strings")
    base = data["base_model"]
    for repo in [base] if isinstance(base, str) else base:
        if not _REPO_ID.match(repo):
            raise ValueError(f"model card base_model {repo!r} is not a Hub repo id")
    headings = re.findall(r"^## (.+?)\s*$", card.text, flags=re.M)
    positions = []
    for section in CARD_SECTIONS:
        if section not in headings:
            raise ValueError(f"model card lacks the section '## {section}'")
        positions.append(headings.index(section))
    if positions != sorted(positions):
        raise ValueError(f"model card sections must follow the order {', '.join(CARD_SECTIONS)}")


# Export / push ----------------------------------------------------------------------------

def export(model: VideoUpscaler, folder: str | os.PathLike, *, repo_id: str | None = None) -> Path:
    """Write a Hub-ready folder: the model's weights and config plus its rendered card as README.md.

    Every file gets the permissions `open()` gives (0644 under the usual umask 022): safetensors
    writes its files private (0600), which would keep a shared or served folder from being read.
    """
    folder = model.save_pretrained(folder)
    render_card(model.hub_name, repo_id=repo_id).save(folder / "README.md")
    mode = _default_file_mode()
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)
    write_checksums(folder)
    return folder


def _default_file_mode() -> int:
    """0o666 less the process umask, the mode `open()` creates files with."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def upscaler_from_checkpoint(ckpt: str | os.PathLike) -> VideoUpscaler:
    """The `VideoUpscaler` of a Lightning checkpoint written by a zoo LightningModule (needs the train extra).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable zoo checkpoint.
        MissingExtraError: Lightning is not installed.
    """
    import pickle

    import torch

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        # weights_only=True refuses foreign pickles (UnpicklingError); torch's zip reader raises
        # RuntimeError on a damaged archive and EOFError on a truncated one.
        raise ValueError(f"{ckpt} is not a readable Lightning checkpoint ({type(err).__name__})") from None
    name = state.get("zoo", {}).get("hub_name") if isinstance(state, dict) else None
    if name is None:
        raise ValueError(f"{ckpt} was not written by a vsr-zoo LightningModule (no 'zoo' entry)")
    require_train_extra(f"reading the Lightning checkpoint {ckpt}")
    module_cls = import_object(get_cfg(name).module)
    module = module_cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return module.to_upscaler().eval()


def export_checkpoint(ckpt: str | os.PathLike, folder: str | os.PathLike, *, repo_id: str | None = None) -> Path:
    """Turn a Lightning checkpoint of a zoo LightningModule into a Hub folder (see `export`)."""
    return export(upscaler_from_checkpoint(ckpt), folder, repo_id=repo_id)


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
         revision: str | None = None) -> str:
    """Upload an exported folder to the Hub; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() and not any(folder.glob("*/config.json")):
        raise FileNotFoundError(f"{folder} is not an exported weights folder (no config.json)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision,
                             commit_message="Upload vsr-zoo weights")
    return str(info)


def download(name: str, *, local_dir: str | os.PathLike | None = None) -> Path:
    """Download `name`'s published weights (into the Hub cache, or `local_dir`)."""
    cfg = get_cfg(name)
    if cfg.repo_id is None:
        raise WeightsUnavailableError(_unpublished(cfg))
    folder = resolve_weights(cfg.repo_id, revision=cfg.revision, allow_patterns=cfg.files, local_dir=local_dir)
    verify_sha256(folder, cfg.sha256)
    return folder
