"""`OSDiffVSRUpscaler`: one-step x4 VSR over a sliding 3-frame window.

Frame `i` is generated from `(I_{i-1}, I_i, I_{i+1})`, so `stream()` holds at most three LR
frames (and their RAFT encodings, made once per frame: `flow_features`) and emits frame `i` once frame
`i + 1` has arrived (one frame of look-ahead). At the ends
the missing neighbour is replaced by the only one there is: the first frame uses `(I_1, I_0, I_1)`,
the last `(I_{T-2}, I_{T-1}, I_{T-2})`, a single frame `(I_0, I_0, I_0)` (the paper does not say
how the ends are handled; a mirrored neighbour keeps the window the network was trained on).

The text condition `c` of Eq. (2) is "text descriptions corresponding to each frame" (P:90). It
travels as CLIP embeddings, so inference loads no text encoder: by default the stored embedding
(the empty prompt's), else one `(1, L, D)` embedding for the whole video or one `(L, D)` per frame
(`network.encode_prompt` makes them from text with SD-2.1's text encoder). Frame `i` is always
generated with its own `c_i`, never a neighbour's.

Weights folder (`save_pretrained` / `from_pretrained`):

- `config.json`: `{"hub_name": "osdiffvsr", "config": OSDiffVSRConfig}`;
- `adapters.safetensors`: the LoRA weights of the VAE encoder and UNet (the trained `default`
  adapters and, when the model started from OSEDiff, its frozen `osediff` ones), and the UNet's
  `conv_in`;
- `mff.safetensors`: the multi-frame-fusion query/key projections;
- `prompt_embeds.safetensors`: the prompt condition `c` (`prompt_embeds`, `(1, L, D)`);
- `base.safetensors`: the remaining weights (SD UNet/VAE, RAFT), only for those that have no
  published source: when `config.base_model` names SD-2.1-base they are loaded from it, and
  torchvision's RAFT weights when `config.flow_pretrained`. A `tiny` (or randomly initialised)
  model therefore carries everything; a model trained from SD-2.1-base carries only what
  training changed.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from zoo.components.flow import FlowFeatures
from zoo.components.memo import StepMemo, memoise_denoiser, unit_output_scales
from zoo.components.tiling import TilePlan, pad_to_multiple
from zoo.components.upscaler import (
    MemoryModel,
    VideoUpscaler,
    check_frame,
    check_frames,
    check_weight_names,
    read_weight_files,
    save_weight_files,
)
from zoo.osdiffvsr.network import OSDiffVSRConfig, OSDiffVSRNet

# Marks the end of a per-frame prompt iterator (None is a valid item of `itertools.repeat(None)`).
_EXHAUSTED = object()

FILES = {
    "adapters": "adapters.safetensors",
    "mff": "mff.safetensors",
    "prompt": "prompt_embeds.safetensors",
    "base": "base.safetensors",
}


# Peak RSS of the full network streamed on CPU at LR 32x32, 64x64 and 96x96 (2 frames, fp32, one thread):
# 5.39, 5.77, 6.24 GB untiled; 5.32, 5.85, 6.28 GB with 16-pixel UNet tiles (`zoo bench
# upscalers.memory_model --arg name=osdiffvsr`). Tiled and untiled slopes agree within the noise
# (104 and 114 kB per LR pixel): the VAE at HR (3 encodes, 1 decode) peaks above the UNet step, so
# UNet tiles do not lower the peak and `tile` gets no memory term (no default tiles).
MEMORY = MemoryModel(frame=104e3, tile=0.0, measured="CPU peak RSS, full network, LR 32-96 px, fp32")


def weight_group(net: OSDiffVSRNet, key: str) -> str:
    """Which file of a weights folder holds the state-dict entry `key` of `net`."""
    # The UNet's conv_in travels with the adapters: starting from OSEDiff replaces it by OSEDiff's
    # fully trained one (`network.load_osediff_lora`), which SD-2.1's published weights do not hold.
    if "lora_" in key or key.startswith("unet.conv_in."):
        return "adapters"
    if key.startswith("fusion."):
        return "mff"
    if key == "prompt_embeds":
        return "prompt"
    return "base"


def published_keys(net: OSDiffVSRNet) -> set[str]:
    """Base weights restored from published sources (SD-2.1-base, torchvision RAFT), not saved."""
    keys = set()
    for key in net.state_dict():
        if weight_group(net, key) != "base":
            continue
        if (key.startswith(("unet.", "vae.")) and net.config.base_model is not None) or (
                key.startswith("flow.") and net.config.flow_pretrained):
            keys.add(key)
    return keys


class OSDiffVSRUpscaler(VideoUpscaler):
    """OS-DiffVSR x4 upscaler (one SD-2.1 UNet step per frame, 3-frame window with fusion).

    Options (`configure`): `tile`, the side in LR pixels of the square tiles on which the UNet step
    runs, blended where they overlap (None: whole frames), `tile_overlap`, their overlap in LR
    pixels, `color_fix` (`"adain"`, `"wavelet"` or `"none"`), and `compile`, which compiles the VAE encoder and
    decoder, UNet, fusion and RAFT's modules one by one (`compile_modules`), or with `scope="step"` each
    window (`upscale_window`, one frame's fixed-shape step), with the VAE and UNet in channels-last, as on
    CUDA (see `VideoUpscaler.compiled`, `channels_last_modules`), and `channels_last`, to choose that
    memory format (`VideoUpscaler`).

    Args:
        config: the generator config (`OSDiffVSRConfig.tiny()` / `.full()` or loaded).
        net: an existing generator to wrap; a new one is built from `config` when None.
    """

    hub_name = "osdiffvsr"
    config_class = OSDiffVSRConfig
    # OS-DiffVSR says nothing of a colour fix. OSEDiff, whose one-step generator it extends, offers
    # wavelet and AdaIN (test_osediff.py `--align_method`, AdaIN by default). Wavelet is the default
    # here because it takes only the input's low-frequency band, which is as steady from frame to frame
    # as the input itself, whereas AdaIN matches each frame's global channel statistics, which shift
    # with the content in view and can make a video's colours pump.
    options: ClassVar[dict[str, Any]] = {"tile": None, "tile_overlap": 32, "color_fix": "wavelet",
                                         "compile": False, "channels_last": None}
    scales = (4,)
    memory = MEMORY

    def __init__(self, config: OSDiffVSRConfig, net: OSDiffVSRNet | None = None) -> None:
        super().__init__(config)
        self.net = OSDiffVSRNet(config) if net is None else net
        self.scale = config.scale

    def check_options(self) -> None:
        if self.tile is not None and not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"tile_overlap must be in [0, tile), got {self.tile_overlap} with tile {self.tile}")

    def channels_last_modules(self) -> list[torch.nn.Module]:
        return [self.net.vae, self.net.unet]

    def compile_modules(self) -> list[torch.nn.Module | tuple[torch.nn.Module, str]]:
        net = self.net
        return [net.vae.encoder, net.vae.decoder, net.unet, net.fusion, *net.flow.compile_modules()]

    @property
    def latent_per_lr(self) -> float:
        """Latent pixels per LR pixel (1/2 for x4 with a VAE factor of 8)."""
        return self.scale / self.net.vae_factor

    def flow_features(self, frame: Tensor) -> FlowFeatures:
        """RAFT's encodings of an LR frame `(N, 3, H, W)` in [0, 1], padded as `upscale_window` pads it.

        A frame is the current frame of one window and a neighbour in two others: `stream()` encodes it once
        here and hands the encodings to its three windows, where each window would encode its current frame
        twice and its neighbours once (RAFT-large at LR 180x320: 16 GFLOP per frame instead of 48).
        """
        padded, _ = pad_to_multiple(frame.to(self.device, self.dtype), self.net.size_multiple)
        return self.net.flow.features(padded)

    @staticmethod
    def flow_pairs(before: FlowFeatures, current: FlowFeatures,
                   after: FlowFeatures) -> tuple[FlowFeatures, FlowFeatures]:
        """A window's flows from its frames' encodings: sources `(current, current)`, destinations `(before, after)`.

        Joined outside the window step: fresh tensors each time, where handing a mirrored neighbour's encodings
        twice to a compiled window would make a graph for the repeated inputs and another for distinct ones.
        """
        return FlowFeatures.cat([current, current]), FlowFeatures.cat([before, after])

    def upscale_window(self, prev: Tensor, current: Tensor, next_: Tensor, *, fuse: bool = True,
                       prompt_embeds: Tensor | None = None,
                       flow_features: tuple[FlowFeatures, FlowFeatures] | None = None) -> Tensor:
        """HR frame `(N, 3, sH, sW)` of `current` `(N, 3, H, W)` given its neighbours; any H, W.

        Frames are padded (edge replication) to the network's size multiple and the output is
        cropped back; with `tile` the UNet step runs on blended latent tiles; `color_fix` applies last.

        Args:
            prev: `I_{i-1}` `(N, 3, H, W)` in [0, 1].
            current: `I_i`.
            next_: `I_{i+1}`.
            fuse: apply multi-frame fusion.
            prompt_embeds: `c_i`, `(1 or N, L, D)`; the stored embedding when None.
            flow_features: RAFT's encodings of `(current, current)` and `(prev, next_)` (`flow_pairs`), or None to
                encode the frames here.
        """
        net, lr = self.net, current
        window, padding = pad_to_multiple(torch.cat([prev, current, next_]).to(self.device, self.dtype),
                                          net.size_multiple)
        prev, current, next_ = window.chunk(3)
        z = net.encode(current)
        if fuse:
            z = net.fuse(prev, current, next_, z, flow_features)
        c = None if prompt_embeds is None else prompt_embeds.to(self.device)
        if self.tile is None:
            z_hat = net.denoise(z, c)
        else:
            size = max(1, round(self.tile * self.latent_per_lr))
            overlap = min(round(self.tile_overlap * self.latent_per_lr), size - 1)
            z_hat = TilePlan(*z.shape[-2:], size, overlap).apply(lambda tile: net.denoise(tile, c), z)
        return self.fix_colors(padding.crop(net.decode(z_hat), self.scale), lr.to(self.device))

    def check_prompt_embeds(self, prompt_embeds: Tensor, name: str = "prompt_embeds") -> Tensor:
        """`prompt_embeds` if it is `(K, L, D)` with the stored embedding's L and D, else a ValueError."""
        _, length, width = self.net.prompt_embeds.shape
        if not isinstance(prompt_embeds, Tensor) or prompt_embeds.ndim != 3 or tuple(prompt_embeds.shape[1:]) != (
                length, width):
            got = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, Tensor) else type(prompt_embeds).__name__
            raise ValueError(f"{name} must be (1 or T, {length}, {width}) CLIP embeddings, got {got}")
        return prompt_embeds

    @torch.no_grad()
    def forward(self, frames: Tensor, prompt_embeds: Tensor | None = None) -> Tensor:
        """Upscale a clip `(T, 3, H, W)` in [0, 1] to `(T, 3, 4H, 4W)`.

        Args:
            frames: the LR clip.
            prompt_embeds: None (the stored embedding), `(1, L, D)` for every frame, or `(T, L, D)`,
                row t the condition of frame t.
        """
        check_frames(frames)
        if prompt_embeds is not None and self.check_prompt_embeds(prompt_embeds).shape[0] != 1:
            if prompt_embeds.shape[0] != frames.shape[0]:
                raise ValueError(f"prompt_embeds must hold 1 or T = {frames.shape[0]} embeddings, got "
                                 f"{prompt_embeds.shape[0]}")
            return torch.stack(list(self.stream(frames.unbind(0), prompt_embeds.unbind(0))))
        return torch.stack(list(self.stream(frames.unbind(0), prompt_embeds)))

    @torch.no_grad()
    def stream(self, frames: Iterable[Tensor],
               prompt_embeds: Tensor | Iterable[Tensor] | None = None) -> Iterator[Tensor]:
        """Upscale frames `(3, H, W)` in [0, 1] one at a time; holds at most three LR frames and their RAFT encodings.

        Yields `(3, 4H, 4W)` frames on the model's device.

        Args:
            frames: the LR frames.
            prompt_embeds: None (the stored embedding), one `(1, L, D)` tensor for every frame, or an
                iterable of `(L, D)` tensors read in step with `frames`, one per frame.
        """
        # An eager run's VAE skips its divisions by output scales of 1 (`unit_output_scales`), whatever the prompt.
        memo = StepMemo()
        unit_output_scales(memo, self.net.vae)
        if prompt_embeds is None or isinstance(prompt_embeds, Tensor):
            if prompt_embeds is not None:
                self.check_prompt_embeds(prompt_embeds)
                if prompt_embeds.shape[0] != 1:
                    raise ValueError(f"a prompt_embeds tensor given to stream() must be (1, L, D), got "
                                     f"{tuple(prompt_embeds.shape)}; pass an iterable for one per frame")
            conditions = itertools.repeat(prompt_embeds)
            # One timestep and one prompt for the whole clip: an eager run computes the UNet's time embeddings
            # and the prompt's cross-attention keys and values once (`StepMemo`).
            memoise_denoiser(memo, self.net.unet)
        else:
            conditions = (self.check_prompt_embeds(c[None], "each per-frame prompt embedding")
                          for c in prompt_embeds)
        window = self.compiled("window", self.upscale_window)
        if window == self.upscale_window:
            window = _memoised(window, memo, self.net.config.timestep)
        encode = self.compiled("flow_features", self.flow_features)  # each frame's RAFT encodings, once
        prev = current = c_current = f_prev = f_current = None
        for index, incoming in enumerate(frames):
            check_frame(incoming, values=index == 0)  # values once per clip: reading them is a host sync
            c_incoming = next(conditions, _EXHAUSTED)
            if c_incoming is _EXHAUSTED:
                raise ValueError("prompt_embeds ran out before the frames: give one embedding per frame")
            f_incoming = encode(incoming[None])
            if current is not None:
                before, f_before = (incoming, f_incoming) if prev is None else (prev, f_prev)
                yield window(before[None], current[None], incoming[None], prompt_embeds=c_current,
                             flow_features=self.flow_pairs(f_before, f_current, f_incoming))[0].float()
            prev, current, c_current, f_prev, f_current = current, incoming, c_incoming, f_current, f_incoming
        if current is not None:
            other, f_other = (current, f_current) if prev is None else (prev, f_prev)
            yield window(other[None], current[None], other[None], prompt_embeds=c_current,
                         flow_features=self.flow_pairs(f_other, f_current, f_other))[0].float()

    def set_prompt_embeds(self, prompt_embeds: Tensor) -> None:
        """Replace the prompt condition `c` by `(1, L, D)` embeddings (see `network.encode_prompt`)."""
        expected = tuple(self.net.prompt_embeds.shape)
        if tuple(prompt_embeds.shape) != expected:
            raise ValueError(f"prompt_embeds must be {expected}, got {tuple(prompt_embeds.shape)}")
        self.net.prompt_embeds.copy_(prompt_embeds)

    @classmethod
    def from_net(cls, net: OSDiffVSRNet) -> OSDiffVSRUpscaler:
        """An upscaler with a copy of `net`'s weights (the training module's generator)."""
        return cls(net.config, net=copy.deepcopy(net))

    # Hub folders -------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `config.json` and the safetensors files listed in the module docstring."""
        self.check_exportable()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.write_config(folder)
        published = published_keys(self.net)
        own = {key: value for key, value in self.net.state_dict().items() if key not in published}
        save_weight_files(folder, own, FILES, lambda key: weight_group(self.net, key))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> OSDiffVSRUpscaler:
        """Build from a folder written by `save_pretrained` (loading SD-2.1-base when it names one)."""
        folder = Path(folder)
        model = cls(cls.read_config(folder))
        if model.config.base_model is not None:
            model.net.load_base(model.config.base_model, prompt=None)
        state = read_weight_files(folder, FILES.values())
        check_weight_names(set(model.net.state_dict()) - published_keys(model.net), state,
                           f"{folder} does not match its config")
        model.net.load_state_dict(state, strict=False)
        return model


def _memoised(window: Any, memo: StepMemo, timestep: int) -> Any:
    """`window` run with `memo` installed, at the one-step sampler's `timestep`."""
    def run(*args: Any, **kwargs: Any) -> Tensor:
        with memo.installed(), memo.step(timestep):
            return window(*args, **kwargs)
    return run
