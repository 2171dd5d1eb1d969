"""LoRA for the zoo's diffusers backbones: configs, injection, adapter-only weights, merging, masked LoRA.

- `lora_config(backbone, rank)`: a peft `LoraConfig` whose targets are the layers that the papers adapt in
  each backbone (`LORA_TARGETS`).
- `inject_lora(model, config, adapter_name)`: adds the adapter in place (peft's low-level API, so it works
  on any `nn.Module`, diffusers models included) and freezes every base weight.
- `lora_state_dict` / `load_lora_state_dict` / `save_lora` / `load_lora`: adapter-only weights (safetensors),
  loaded strictly.
- `merge_lora(model)`: folds the peft adapters into the base weights for inference; `lora_layer_count` counts
  the peft layers left.
- `MaskedLoRA`: a LoRA delta multiplied element-wise by a per-token mask (OSDEnhancer's temporal expert),
  applied with `apply_masked_lora` and fed with `masked_lora_mask(model, mask)`.

Both kinds of adapter keep their tensors under `<layer>.lora_A.<adapter>.weight` /
`<layer>.lora_B.<adapter>.weight`, so one set of state-dict helpers serves both. Adapter-only state dicts
drop the adapter segment (`<layer>.lora_A.weight`), as peft and diffusers write them, so a file saved
under one adapter name loads under another.

Use these helpers rather than diffusers' own adapter methods (`set_adapters`, `fuse_lora`): injection goes
through peft directly, which diffusers' adapter bookkeeping does not see.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

# Layer names (suffixes of `named_modules()` names, peft's list semantics) adapted in each backbone, checked
# against the diffusers modules in tests/components/test_lora.py.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    # OSEDiff's UNet list (cswry/OSEDiff `initialize_unet`): attention, feed-forward, transformer
    # projections and every convolution; `time_emb_proj` is not in it (pass it in `extra_targets`).
    "sd_unet": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv",
        "conv1",
        "conv2",
        "conv_in",
        "conv_out",
        "conv_shortcut",
    ),
    # OSEDiff's VAE list, restricted to `encoder.` (see `ENCODER_ONLY`) so the decoder stays untouched.
    "sd_vae_encoder": (
        "conv",
        "conv1",
        "conv2",
        "conv_in",
        "conv_out",
        "conv_shortcut",
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
    ),
    # CogVideoX blocks: joint text-video attention and the feed-forward (`ff` itself is a container).
    "cogvideox_transformer": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    # Wan blocks: self-attention `attn1`, cross-attention `attn2` and the feed-forward `ffn`.
    "wan_transformer": ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
}

# Backbones whose targets live under one prefix. peft reads a string `target_modules` as a regex that must
# match the whole module name, which is how "encoder.…conv1" is selected while "decoder.…conv1" is not.
# `quant_conv` (the encoder's output projection, outside `encoder.`) is also adapted by OSEDiff; the
# full match keeps `post_quant_conv` out.
ENCODER_ONLY: dict[str, str] = {"sd_vae_encoder": r"encoder\.(?:.*\.)?(?:{names})|quant_conv"}


def lora_config(
    backbone: str,
    rank: int = 32,
    alpha: float | None = None,
    dropout: float = 0.0,
    extra_targets: Sequence[str] = (),
) -> LoraConfig:
    """A peft `LoraConfig` adapting the layers of `LORA_TARGETS[backbone]`.

    Args:
        backbone: a key of `LORA_TARGETS`: "sd_unet", "sd_vae_encoder", "cogvideox_transformer",
            "wan_transformer". Inject into that diffusers model itself (for "sd_vae_encoder", the
            `AutoencoderKL`), since targets are matched against its own module names.
        rank: LoRA rank r.
        alpha: LoRA alpha; the delta is scaled by alpha / r. None means alpha = r (scale 1).
        dropout: dropout on the LoRA branch input.
        extra_targets: more layer names to adapt, with the same matching as the built-in ones.

    Returns:
        The config; B starts at zero, so an injected model first computes exactly what the base model does.
    """
    if backbone not in LORA_TARGETS:
        raise ValueError(f"backbone must be one of {sorted(LORA_TARGETS)}, got {backbone!r}")
    names = (*LORA_TARGETS[backbone], *extra_targets)
    if backbone in ENCODER_ONLY:
        targets: str | list[str] = ENCODER_ONLY[backbone].format(names="|".join(map(re.escape, names)))
    else:
        targets = list(names)
    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout, target_modules=targets)


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Adds a LoRA adapter to `model` in place and freezes every base weight.

    Every adapter injected so far stays active and trainable (OSEDiff-style models stack several adapters
    on one UNet); `MaskedLoRA` layers already present keep their trainable state.

    Args:
        model: any module, typically a diffusers model (UNet, VAE, transformer).
        config: from `lora_config`.
        adapter_name: the adapter's name in parameter names (`lora_A.<adapter_name>`).

    Returns:
        `model`, with peft LoRA layers in place of the targeted layers.
    """
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"model already has a LoRA adapter named {adapter_name!r}")
    with warnings.catch_warnings():
        # peft warns whenever a second adapter joins a model; stacking adapters is intended here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name)
    adapters = list(model.peft_config)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(adapters)
    return model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of one adapter (peft LoRA and `MaskedLoRA` alike), keys without the adapter name.

    Args:
        model: a model with the adapter injected.
        adapter_name: which adapter.

    Returns:
        `{"<layer>.lora_A.weight": tensor, ...}`, detached, sharing storage with the model.
    """
    state = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        adapter_free = _drop_adapter_segment(key, adapter_name)
        if adapter_free is not None:
            state[adapter_free] = tensor.detach()
    if not state:
        raise ValueError(f"model has no LoRA adapter named {adapter_name!r}")
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Loads adapter-only tensors (from `lora_state_dict`) into an injected adapter, strictly.

    Args:
        model: a model with the adapter already injected (same targets and rank as when saved).
        state: `{"<layer>.lora_A.weight": tensor, ...}`.
        adapter_name: the adapter to fill; need not be the name the tensors were saved under.
    """
    expected = lora_state_dict(model, adapter_name)
    missing = sorted(expected.keys() - state.keys())
    unknown = sorted(state.keys() - expected.keys())
    if missing or unknown:
        raise ValueError(
            f"LoRA state does not fit adapter {adapter_name!r}: {len(missing)} missing keys "
            f"{missing[:3]} and {len(unknown)} unknown keys {unknown[:3]}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"LoRA tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor)


def save_lora(path: str | Path, model: nn.Module, adapter_name: str = "default") -> None:
    """Writes one adapter's tensors (only those) to a safetensors file.

    Args:
        path: the file to write.
        model: a model with the adapter injected.
        adapter_name: which adapter.
    """
    tensors = {key: tensor.contiguous() for key, tensor in lora_state_dict(model, adapter_name).items()}
    save_file(tensors, str(path))


def load_lora(path: str | Path, model: nn.Module, adapter_name: str = "default") -> None:
    """Loads a safetensors file written by `save_lora` into an injected adapter, strictly.

    Args:
        path: the file to read.
        model: a model with the adapter already injected.
        adapter_name: the adapter to fill.
    """
    load_lora_state_dict(model, load_file(str(path)), adapter_name)


def lora_layer_count(model: nn.Module) -> int:
    """How many peft LoRA layers `model` holds (each a base layer plus its low-rank branches)."""
    return sum(isinstance(module, BaseTunerLayer) for module in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every active peft LoRA adapter into its base layer and removes the LoRA layers.

    `MaskedLoRA` layers stay as they are: a per-token mask cannot be folded into a weight.

    Args:
        model: a model with peft adapters injected.

    Returns:
        `model`, with plain layers where the LoRA layers were, computing the same outputs.
    """
    tuner_layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if not tuner_layers:
        raise ValueError(f"{type(model).__name__} has no peft LoRA layers to merge")
    for name, module in tuner_layers:
        module.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, module.get_base_layer())
    del model.peft_config
    return model


def _drop_adapter_segment(key: str, adapter_name: str) -> str | None:
    """`a.lora_A.<adapter_name>.weight` -> `a.lora_A.weight`; None when `key` is not of that adapter."""
    parts = key.split(".")
    for i in range(len(parts) - 1):
        if parts[i].startswith("lora_") and parts[i + 1] == adapter_name:
            return ".".join(parts[: i + 1] + parts[i + 2 :])
    return None


class MaskedLoRA(nn.Module):
    """A linear layer plus a LoRA delta gated per token: y = base(x) + m ⊙ (alpha / r) · B A dropout(x).

    x is (B, N, in_features) (or any (..., in_features)), m the per-token mask of shape x.shape[:-1]
    (a trailing singleton dimension is accepted), A: in -> r and B: r -> out the low-rank factors. B starts
    at zero, so the layer first computes exactly `base(x)`. The mask is set before the forward with
    `set_mask` or `masked_lora_mask` and is never stored in the state dict.

    Args:
        base: the wrapped layer: an `nn.Linear`, or a layer with `in_features`/`out_features` acting on the
            last dimension (a peft LoRA layer, to stack a masked expert on a plain one).
        rank: r.
        alpha: alpha; None means alpha = r.
        dropout: dropout on the LoRA branch input.
        adapter_name: the adapter's name; the factors live in `lora_A[adapter_name]` / `lora_B[adapter_name]`
            so their state-dict keys read like peft's.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        self.base = base
        self.adapter_name = adapter_name
        self.scale = (rank if alpha is None else alpha) / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        self.lora_A = nn.ModuleDict(
            {adapter_name: nn.Linear(base.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)}
        )
        self.lora_B = nn.ModuleDict(
            {adapter_name: nn.Linear(rank, base.out_features, bias=False, device=weight.device, dtype=weight.dtype)}
        )
        # peft's default LoRA initialisation: Kaiming-uniform A, zero B.
        nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        self.mask: torch.Tensor | None = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Sets the per-token mask m used by the following forwards; None clears it.

        Args:
            mask: (B, N) or (B, N, 1), matching the leading dimensions of the layer's input.
        """
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError(
                f"MaskedLoRA {self.adapter_name!r} has no mask: run the model inside masked_lora_mask(model, mask)"
            )
        mask = self.mask
        if mask.shape == (*x.shape[:-1], 1):
            mask = mask[..., 0]
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"mask must have shape {tuple(x.shape[:-1])} (the input's tokens), got {tuple(mask.shape)}"
            )
        delta = self.lora_B[self.adapter_name](self.lora_A[self.adapter_name](self.dropout(x)))
        return self.base(x) + mask.unsqueeze(-1).to(delta.dtype) * (self.scale * delta)


def apply_masked_lora(
    model: nn.Module,
    target_modules: Sequence[str],
    rank: int,
    alpha: float | None = None,
    adapter_name: str = "default",
    dropout: float = 0.0,
) -> nn.Module:
    """Replaces the targeted linear layers of `model` by `MaskedLoRA` layers, in place.

    Only the new LoRA factors are left trainable within the replaced layers; the rest of `model` keeps its
    `requires_grad`. Inject peft adapters (`inject_lora`) before this, not after: peft cannot wrap a
    `MaskedLoRA`.

    Args:
        model: the model to adapt.
        target_modules: layer names with peft's list semantics: a module is targeted when its name equals
            an entry or ends with "." + entry (e.g. "to_q", "attn1.to_out.0").
        rank: r.
        alpha: alpha; None means alpha = r.
        adapter_name: the adapter's name.
        dropout: dropout on the LoRA branch input.

    Returns:
        `model`.
    """
    targets = [
        name
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in target_modules) and _acts_as_linear(module)
    ]
    if not targets:
        raise ValueError(f"no linear layer of {type(model).__name__} matches target_modules {list(target_modules)}")
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        base.requires_grad_(False)
        setattr(parent, child_name, MaskedLoRA(base, rank, alpha, dropout, adapter_name))
    return model


def _acts_as_linear(module: nn.Module) -> bool:
    """An `nn.Linear`, or a peft LoRA layer around one."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return isinstance(module, nn.Linear)


def masked_lora_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[MaskedLoRA]:
    """The `MaskedLoRA` layers of `model`, all of them or those of one adapter."""
    for module in model.modules():
        if isinstance(module, MaskedLoRA) and adapter_name in (None, module.adapter_name):
            yield module


@contextmanager
def masked_lora_mask(model: nn.Module, mask: torch.Tensor, adapter_name: str | None = None) -> Iterator[None]:
    """Sets `mask` on the `MaskedLoRA` layers of `model` for the duration of the block, then clears it.

    Args:
        model: a model with `MaskedLoRA` layers.
        mask: (B, N) or (B, N, 1) per-token weights of the LoRA delta.
        adapter_name: only the layers of this adapter; None means all.
    """
    layers = list(masked_lora_layers(model, adapter_name))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MaskedLoRA layers for adapter {adapter_name!r}")
    for layer in layers:
        layer.set_mask(mask)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_mask(None)


def load_base_weights(model: nn.Module, published: dict[str, torch.Tensor], *, skip: Callable[[str], bool],
                      what: str) -> None:
    """Load a published base checkpoint into `model`, whose adapted layers keep it under peft's `.base_layer.`.

    Every key of `model` that `skip` does not exclude (the adapters and modules the published model lacks)
    must be in `published` and the other way round; anything else is one `ValueError` that counts both.

    Args:
        model: the adapted model.
        published: the published model's state dict.
        skip: whether a key of `model` is its own addition, left as initialised.
        what: the sentence's subject, e.g. "org/base transformer does not fit OSDEnhancer".
    """
    from zoo.components.upscaler import check_weight_names

    own = {key.replace(".base_layer.", "."): key for key in model.state_dict() if not skip(key)}
    check_weight_names(own, published, what)
    model.load_state_dict({own[key]: value for key, value in published.items()}, strict=False)
