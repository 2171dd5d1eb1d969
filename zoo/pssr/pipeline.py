"""`PSSRUpscaler`: x4 speculative diffusion over overlapping 4N+1-frame chunks, optionally in spatial tiles.

A clip is cut into chunks of `chunk` frames (33 = 4 * 8 + 1: nine latent frames of the Wan VAE) that
overlap by `chunk_overlap` frames; each chunk runs the whole sampler (encode, one base step, T - 1
draft steps with the frequency-domain update) and the overlaps are merged with position-weighted
averaging (raised-cosine weights, `zoo.components.tiling`): the paper's "overlapping clip splitting
and merging ... temporal position-aware averaging" (L304, whose details are in a supplement we do
not have). The last chunk ends at the clip's end; a clip shorter than a chunk is one chunk, padded
to 4n+1 frames by repeating its last frame. `stream()` holds one chunk of LR frames (and reads ahead
to the next chunk's start) and the HR frames still inside an overlap.

With `tile`, each chunk runs tile by tile (LR tiles of `tile` pixels overlapping by `tile_overlap`,
blended on the HR output): the draft reads the base's features token by token and the
frequency-domain update needs the whole sampler's `x`, so tiles run the whole sampler, not one DiT.

Weights folder (`save_pretrained` / `from_pretrained`):

- `config.json`: `{"hub_name": "pssr", "config": PSSRConfig}`;
- `adapters.safetensors`: the base's LoRA;
- `draft.safetensors`: the whole draft (pruned DiT and fusion layers);
- `prompt_embeds.safetensors`: the text condition (the empty prompt's UMT5 embedding);
- `base.safetensors`: the base DiT and VAE weights, only when `config.base_model` is None; otherwise
  they load from that Wan2.1 folder or Hub id, so a model trained from Wan2.1 carries only what
  training made.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from zoo.components.tiling import TilePlan, pad_to_multiple, stream_chunks, valid_length
from zoo.components.upscaler import (
    VideoUpscaler,
    check_frame,
    check_frames,
    check_weight_names,
    read_weight_files,
    save_weight_files,
)
from zoo.pssr.network import ALPHA, FDU_FORMS, FDU_SIGMA, NUM_STEPS, PSSRConfig, PSSRNet, check_float32_vae

FILES = {
    "adapters": "adapters.safetensors",
    "draft": "draft.safetensors",
    "prompt": "prompt_embeds.safetensors",
    "base": "base.safetensors",
}

# Peak bytes beyond the weights, as `zoo bench --count-only` estimates them over the full network's stream() on fake
# tensors (`zoo.bench.pipeline.DispatchCounter`). The peak is in the Wan VAE at HR size (its cached frames and 3-D
# convolutions), so it grows with the pixels one sampler run sees (the tile, or the whole frame) and barely with the
# chunk.
# - Per pixel of a sampler run, a fixed part and one per chunk frame, keyed by the bytes per element of the DiTs, the
#   VAE encoder and the VAE decoder (exact at each of these points; measured untiled, bfloat16 DiTs unless said):
#   - float32 encoder, bfloat16 decoder (`float32_vae="encoder"`): 0.886e9 bytes at LR 64x64 and 9 frames, 0.926e9
#     at 33; 1.773e9 at 64x128, 3.545e9 at 128x128, 12.464e9 at 180x320 (9 frames), 13.023e9 at 180x320 (33);
#   - float32 VAE (`"all"`): 1.263e9 at 64x64 and 9 frames, 2.526e9 at 64x128, 5.052e9 at 128x128, 17.76e9 at
#     180x320 (9 frames), 1.351e9 at 64x64 and 18.995e9 at 180x320 (33 frames); 1.287e9 and 1.422e9 at 64x64 (9,
#     33 frames) with float32 DiTs;
#   - bfloat16 VAE (`"none"`): 0.647e9 and 0.725e9 at 64x64 (9, 33 frames), 1.294e9 at 64x128, 9.102e9 and
#     10.200e9 at 180x320 (9, 33 frames).
# - Per LR pixel of the whole frame and chunk frame, the same with any VAE: 256 bytes of blended HR tiles
#   (0.038e9 over 64x64 tiles at 128x128, 0.131e9 at 256x256, 9 frames; 0.247e9 at 128x256 and 0.543e9 over 128x128
#   tiles at 256x256, 33 frames: 222 to 256 measured, the largest kept), and 384 bytes of the previous chunk's HR
#   frames once a clip has a second chunk (0.014e9 at 64x64 and 9 frames, 0.027e9 at 17).
SAMPLER_BYTES_PER_PIXEL = {
    (2, 4, 2): (212_760, 404),
    (2, 4, 4): (300_278, 894),
    (4, 4, 4): (301_724, 1_376),
    (2, 2, 2): (150_874, 794),
}
# The same for the tiny network (`PSSRConfig.tiny()`, the tests' and smoke runs'), whose 4-channel VAE no longer
# holds the peak, which grows with the chunk's frames instead (bytes at LR 64x64 with chunks of 1, 5, 9, 17, 33
# frames, untiled: 8.61e6, 35.77e6, 45.20e6, 68.62e6, 133.08e6 by default; 16.30e6, 47.14e6, 59.24e6, 72.97e6,
# 133.60e6 in float32), and linear in the pixels (2x at 64x128, 4x at 128x128). The line through the 5- and 33-frame
# counts (rounded up) is at or above every count from 1 to 33 frames, with each VAE setting. With the frame terms,
# `estimate_memory` is 1.00 to 2.72 times each of 32 counts (chunks of 1 to 33 frames, LR 32x48 to 128x192, tiles
# of 64, clips of two chunks; 2.72 at one-frame chunks). Any other size is costed with the full network's
# coefficients, which bound smaller ones from above.
TINY_SAMPLER_BYTES_PER_PIXEL = {
    (2, 4, 2): (4_490, 849),
    (2, 4, 4): (7_729, 751),
    (4, 4, 4): (7_739, 754),
    (2, 2, 2): (1_921, 927),
}
TILE_BYTES_PER_PIXEL_FRAME = 256
STREAM_BYTES_PER_PIXEL_FRAME = 384


def weight_group(key: str) -> str:
    """Which file of a weights folder holds the state-dict entry `key` of a `PSSRNet`."""
    if "lora_" in key:
        return "adapters"
    if key.startswith("draft."):
        return "draft"
    if key == "prompt_embeds":
        return "prompt"
    return "base"


def published_keys(net: PSSRNet) -> set[str]:
    """Base DiT and VAE weights restored from `config.base_model` rather than saved (none without one)."""
    if net.config.base_model is None:
        return set()
    return {key for key in net.state_dict() if weight_group(key) == "base"}


class PSSRUpscaler(VideoUpscaler):
    """PS-SR x4 upscaler: one Wan2.1 base step, T - 1 pruned-draft steps, frequency-domain update.

    Options (`configure`):

    - `num_steps`: T, the speculative steps (4, L164; 1 runs the base alone).
    - `alpha`: the refinement strength of the frequency-domain update (0.6, L164).
    - `fdu_form`: `"additive"` (default) or `"literal"` (Eq. 14 as printed); see
      `zoo.pssr.network.updated_high_band` for why.
    - `fdu_sigma`: the FDU high-pass's Gaussian standard deviation in HR pixels.
    - `chunk`: LR frames per chunk, of the form 4n+1.
    - `chunk_overlap`: frames shared by neighbouring chunks.
    - `tile`: side of square LR tiles (a multiple of 4), or None for whole frames.
    - `tile_overlap`: overlap of neighbouring tiles in LR pixels (a multiple of 4).
    - `float32_vae`: the parts of the Wan VAE kept in float32 under a half dtype: `"encoder"` (the default:
      encode in float32, decode in the model's dtype), `"all"` (as the Wan pipelines run it) or `"none"`; see
      `FLOAT32_VAE_PARTS` for why, and the README for what each costs. Setting it casts the VAE; back to
      float32 does not restore rounded weights.
    - `compile`: compile the DiT blocks and the VAE encoder and decoder one by one (`compile_modules`), or
      with `scope="step"` the sampler of each chunk (or tile), a fixed-shape step (see
      `VideoUpscaler.compiled`). The Wan VAE keeps the default memory format: its convolutions are
      3-D and causal in time, with cached frames concatenated per call.

    Args:
        config: the network config (`PSSRConfig.tiny()` / `.full()` or loaded).
        net: an existing network to wrap; a new one is built from `config` when None.
    """

    hub_name = "pssr"
    config_class = PSSRConfig
    options: ClassVar[dict[str, Any]] = {
        "num_steps": NUM_STEPS,
        "alpha": ALPHA,
        "fdu_form": "additive",
        "fdu_sigma": FDU_SIGMA,
        "chunk": 33,
        "chunk_overlap": 8,
        "tile": None,
        "tile_overlap": 32,
        "float32_vae": "encoder",
        "compile": False,
    }
    scales = (4,)

    def __init__(self, config: PSSRConfig, net: PSSRNet | None = None) -> None:
        super().__init__(config)
        self.net = PSSRNet(config) if net is None else net
        self.scale = config.scale

    @property
    def dtype(self) -> torch.dtype:
        """The DiTs' compute dtype (the DiTs' float32 islands, and the VAE parts `float32_vae` names, stay float32
        under a half dtype)."""
        return self.net.dit_dtype

    def configure(self, **options: Any) -> PSSRUpscaler:
        super().configure(**options)
        if "float32_vae" in options:
            self.net.set_float32_vae(self.float32_vae)
        return self

    def compile_modules(self) -> list[torch.nn.Module]:
        # The DiTs block by block: the base step hooks the blocks the draft reads (`PSSRNet.base_velocity`),
        # which a compiled whole base would see as a new hook, and so a new graph, at every chunk. The blocks
        # of both DiTs share one class and shapes, so one graph; the rest of each DiT (patch and time
        # embeddings, head) and the draft's fusions run eagerly.
        net = self.net
        return [*net.base.blocks, *net.draft.transformer.blocks, net.vae.encoder, net.vae.decoder]

    def check_options(self) -> None:
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        check_float32_vae(self.float32_vae)
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if self.fdu_form not in FDU_FORMS:
            raise ValueError(f"fdu_form must be one of {', '.join(FDU_FORMS)}, got {self.fdu_form!r}")
        if not self.fdu_sigma > 0:
            raise ValueError(f"fdu_sigma must be positive, got {self.fdu_sigma!r}")
        if self.chunk < 1 or valid_length(self.chunk, "4n+1") != self.chunk:
            raise ValueError(f"chunk must be a positive number of frames of the form 4n+1, got {self.chunk}")
        if not 0 <= self.chunk_overlap < self.chunk:
            raise ValueError(f"chunk_overlap must be in [0, chunk), got {self.chunk_overlap} with chunk {self.chunk}")
        multiple = self.net.size_multiple
        if self.tile is not None and (self.tile < multiple or self.tile % multiple or self.tile_overlap % multiple
                                      or not 0 <= self.tile_overlap < self.tile):
            raise ValueError(f"tile and tile_overlap must be multiples of {multiple} with 0 <= tile_overlap < tile, "
                             f"got {self.tile} and {self.tile_overlap}")

    def estimate_memory(self, height: int, width: int) -> int | None:
        """Peak bytes beyond the weights of a clip of `height x width` LR frames with the current options.

        From `zoo bench`'s fake-tensor estimates (`SAMPLER_BYTES_PER_PIXEL`, or `TINY_SAMPLER_BYTES_PER_PIXEL` for the
        tiny network; `TILE_BYTES_PER_PIXEL_FRAME`, `STREAM_BYTES_PER_PIXEL_FRAME`), at the padded size the networks
        run at.
        """
        multiple = self.net.size_multiple
        height, width = (-(-side // multiple) * multiple for side in (height, width))
        run_h, run_w = (height, width) if self.tile is None else (min(self.tile, height), min(self.tile, width))
        # A dtype wider than float32 is costed as float32 (never used for inference; not measured).
        dtypes = (self.dtype, self.net.vae_encoder_dtype, self.net.vae_decoder_dtype)
        tiny = PSSRConfig.tiny()
        sizes = (self.net.config.transformer, self.net.config.vae)
        table = TINY_SAMPLER_BYTES_PER_PIXEL if sizes == (tiny.transformer, tiny.vae) else SAMPLER_BYTES_PER_PIXEL
        fixed, per_frame = table[tuple(min(torch.finfo(dtype).bits // 8, 4) for dtype in dtypes)]
        frame_level = STREAM_BYTES_PER_PIXEL_FRAME + (0 if self.tile is None else TILE_BYTES_PER_PIXEL_FRAME)
        return int(run_h * run_w * (fixed + per_frame * self.chunk) + height * width * self.chunk * frame_level)

    def default_options(self, height: int, width: int, free_bytes: int) -> dict[str, Any]:
        """Whole frames where they fit `MEMORY_HEADROOM` of `free_bytes`, else the largest tile that fits
        (`fitting_tile`).

        At 720p output in bfloat16 a clip in 33-frame chunks of whole frames needs about 13.8 GB beyond the 4.3 GB of
        weights: with 24 GB free it runs whole, with 16 GB in tiles of 256 LR pixels, with 14 GB in tiles of 192
        (with the whole VAE in float32, 19.7 GB: tiles of 256 with 24 GB free).
        """
        return self.fitting_tile(height, width, free_bytes)

    def sample(self, lr: Tensor) -> Tensor:
        """The sampler on LR frames `(T, 3, h, w)` (`T = 4n + 1`, sizes multiples of `net.size_multiple`)."""
        return self.net(lr[None], num_steps=self.num_steps, alpha=self.alpha, fdu_form=self.fdu_form,
                        fdu_sigma=self.fdu_sigma)[0]

    @torch.no_grad()
    def upscale_chunk(self, lr: Tensor) -> Tensor:
        """HR frames `(L, 3, sH, sW)` in [0, 1] of one chunk `(L, 3, H, W)`, `L = 4n + 1`, any `H`, `W`.

        Frames are padded (edge replication) to the network's size multiple and the output is
        cropped back; with `tile`, the sampler runs on blended tiles.
        """
        check_frames(lr, values=False)  # values are checked once per clip (`_checked_shapes`): a host sync
        lr, padding = pad_to_multiple(lr.to(self.device, torch.float32), self.net.size_multiple)
        sample = self.compiled("chunk", self.sample)
        if self.tile is None:
            hr = sample(lr)
        else:
            hr = TilePlan(*lr.shape[-2:], self.tile, self.tile_overlap, scale=self.scale).apply(sample, lr)
        return padding.crop(hr, self.scale)

    def stream(self, frames: Iterable[Tensor]) -> Iterator[Tensor]:
        """Upscale frames `(3, H, W)` in [0, 1] arriving one at a time; yields `(3, 4H, 4W)` on the model's device."""
        return stream_chunks(self.upscale_chunk, _checked_shapes(frames), self.chunk, self.chunk_overlap,
                             align="4n+1")

    @classmethod
    def from_net(cls, net: PSSRNet) -> PSSRUpscaler:
        """An upscaler with a copy of `net`'s weights (the training module's networks)."""
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
        save_weight_files(folder, own, FILES, lambda key: weight_group(key))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> PSSRUpscaler:
        """Build from a folder written by `save_pretrained` (loading Wan2.1 when its config names it)."""
        folder = Path(folder)
        model = cls(cls.read_config(folder))
        if model.config.base_model is not None:
            model.net.load_base(model.config.base_model, prompt=None)
        state = read_weight_files(folder, FILES.values())
        check_weight_names(set(model.net.state_dict()) - published_keys(model.net), state,
                           f"{folder} does not match its config")
        model.net.load_state_dict(state, strict=False)
        return model


def _checked_shapes(frames: Iterable[Tensor]) -> Iterator[Tensor]:
    """`frames`, each checked to be `(3, H, W)` of one size; values on the first frame only.

    Reading values makes the host wait for the device: once per clip, not once per frame or chunk.
    """
    size = None
    for frame in frames:
        check_frame(frame, values=size is None)
        if size is None:
            size = frame.shape
        elif frame.shape != size:
            raise ValueError(f"every frame of a clip must have one size; got {tuple(frame.shape)} after "
                             f"{tuple(size)}")
        yield frame
