"""`OSDEnhancerUpscaler`: one-step space-time VSR in temporal chunks of `8n + 1` output frames.

Per input frame pair the upscaler builds, at the output frame rate and size (paper Sec. 3.2):

- `I†_in`: the `K = temporal_scale - 1` blends of Eq. (2) between the two LR frames and the second LR
  frame, each bilinearly upsampled by `scale` and clamped to [0, 1], then mapped to [-1, 1];
- `I^Δ`: Eq. (3), `Up(I_{2n+1}) - Up(I_{2n-1})` on the blended frames and 0 on the key frame, raw.

Both are reflect-padded, centred, to multiples of 16. Output frames are cut into chunks of `chunk`
frames (the official schedule: starts `0, chunk - chunk_overlap, ...`, the last chunk shifted back to end
at the clip's end), each padded to `8n + 1` frames by repeating its last frame, encoded (video, then
residual, each drawing its posterior noise), denoised in one step and decoded on its own. Where chunks
overlap, `overlap="drop"` keeps the earlier chunk's frames (the official pipeline) and `overlap="blend"`
cross-fades them with raised-cosine weights (the zoo's default, no seams). `stream()` holds one chunk of
inputs, one frame of look-ahead and the outputs still inside an overlap.

Sizes of the chunk options are in OUTPUT frames, unlike the zoo's other pipelines: the transformer's
chunk is `8n + 1` frames at the output rate, and its chunks may start between two input frames.

Weights folder: the official layout (`transformer/`, `vae/`, `scheduler/`,
`prompt_embeddings/empty.safetensors`); folders the zoo exports add a root `config.json`. See
`from_pretrained` for how the two differ.
"""

from __future__ import annotations

import copy
import json
import math
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import CogVideoXDPMScheduler
from safetensors.torch import save_file
from torch import Tensor

from zoo.components.tiling import Padding, pad_frames, pad_to_multiple, valid_length
from zoo.components.upscaler import (
    MEMORY_HEADROOM,
    VideoUpscaler,
    check_frame,
    check_frames,
    cpu_state,
    from_pretrained_strict,
    load_strict,
    read_safetensors,
)
from zoo.osdenhancer.network import (
    SE_ADAPTER,
    OSDEnhancerConfig,
    OSDEnhancerNet,
    OSDEnhancerTransformer,
    OSDEnhancerVAE,
    interpolation_weights,
    upsample,
)

PROMPT_FILE = "prompt_embeddings/empty.safetensors"
PROMPT_KEY = "prompt_embedding"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMER_INDEX = "diffusion_pytorch_model.safetensors.index.json"
EXPERT_KEYS = ("tr_rank", "tr_alpha", "se_rank", "se_alpha")
ZOO_SETTINGS = ("timestep",)
SIZE_MULTIPLE = 16
"""Frames are padded to multiples of 16: the VAE's 8x times the transformer's 2x2 patches."""
# Peak bytes beyond the weights of one chunk in bfloat16, as `zoo bench --count-only` estimates them over the full
# network's stream() on fake tensors (`zoo.bench.pipeline.DispatchCounter`), at output sizes 360x640 to 1080x1920
# (padded to 16) and chunks of 17 or 33 output frames. Untiled: 11.69 GiB at 360x640 and 45.74 GiB at 720x1280
# (33 frames), 57.26 at 816x1440, 71.11 at 912x1600, 80.09 at 960x1712, 67.36 at 720x1920 and 67.86 at 1080x1280
# (17 frames). Tiled (tiles of 240x360 pixels): 4.48 GiB at 480x720, 4.51 at 504x736, 5.09 at 720x1280 and 6.34
# at 1080x1920 (17 frames), 6.01 at 720x1280 (33 frames). Fitted, within 2.2% of each (0.5% from 480x720 up):
# every chunk holds 67 bytes per output pixel and frame (videos, latents, the transformer's tokens); the VAE adds
# 0.37 GB + 50,680 bytes per output pixel untiled, 4.11 GiB tiled.
CHUNK_BYTES_PER_PIXEL_FRAME = 67
UNTILED_VAE_BYTES = (0.37e9, 50_680)
TILED_VAE_BYTES = 4.11 * 2**30
# The tiny network (`OSDEnhancerConfig.tiny()`, the tests' and smoke runs'): bytes per output pixel, fixed and per
# chunk frame, by bytes per element of the upscaler's dtype, counted the same way. Its 8-channel VAE does not hold
# the peak as the full one does, so the full network's coefficients put a 256x256 output chunk at 7.7 GB in float32
# against 0.52 GB counted. Untiled, float32: 130.8e6 bytes at 128x128 output and 523.2e6 at 256x256 (33 frames),
# 472.6e6 at 256x256 and 443.1e6 at 192x320 (17), 184.9e6 at 128x192 in two 17-frame chunks (the previous chunk's
# frames on top); bfloat16 (float32 islands keep it above half): 340.8e6 and 277.7e6 at 256x256 (33, 17 frames),
# 260.4e6 at 192x320 (17), 111.8e6 at 128x192 in two 17-frame chunks. The values are the fit through one chunk's
# frames, with the frame term raised to cover the two-chunk clips: 1.00 to 1.08x each float32 count, 1.00 to 1.12x
# each bfloat16 one. The official tiles held less at every size counted (0.49 to 1.00x the untiled peak: 497.0e6
# at 256x256, 1021.0e6 at 512x512, 33 frames, float32), so the untiled figure bounds them too (up to 2.2x).
TINY_BYTES_PER_PIXEL = {4: (6_392, 67), 2: (3_218, 79)}
OVERLAP_MODES = ("blend", "drop")


def chunk_starts(num_frames: int, chunk: int, overlap: int) -> list[int]:
    """First frames of the chunks covering `num_frames` frames (the official schedule).

    Chunks start `chunk - overlap` apart while they end before the clip does; the last one ends at the
    clip's end (so it may overlap its predecessor by more). A clip of at most `chunk` frames is one chunk.
    """
    if num_frames <= chunk:
        return [0]
    step = chunk - overlap
    starts = list(range(0, num_frames - chunk, step))
    return [*starts, num_frames - chunk]


def crossfade(length: int) -> list[float]:
    """`length` raised-cosine weights rising in (0, 1); a ramp and its mirror image sum to 1 (as `ChunkPlan`)."""
    return [0.5 - 0.5 * math.cos(math.pi * k / (length + 1)) for k in range(1, length + 1)]


class OSDEnhancerUpscaler(VideoUpscaler):
    """OSDEnhancer: x`scale` in space, x`temporal_scale` in time, one diffusion step per chunk.

    N input frames give `(N - 1) * temporal_scale + 1` output frames (`temporal_scale - 1` between each
    pair), so the output runs at `temporal_scale` times the input frame rate; each is
    `floor(scale H) x floor(scale W)`.

    Options (`configure`):
        scale: spatial factor, any number >= 1 (the paper runs 4 to 16).
        temporal_scale: temporal factor, an int >= 1.
        chunk: output frames per chunk, `8n + 1` with n >= 1; None processes the clip as one chunk (the
            official default, memory growing with the clip).
        chunk_overlap: output frames shared by neighbouring chunks, in [0, chunk).
        overlap: `"blend"` cross-fades overlapping frames, `"drop"` keeps the earlier chunk's (official).
        seed: seed of the posterior noise when no generator is given.
        compile: compile the transformer and the VAE encoder and decoder one by one (`compile_modules`), or
            with `scope="step"` each chunk's networks (`OSDEnhancerNet.upscale_clip`, fixed-shape per chunk
            length) in one graph (see `VideoUpscaler.compiled`). Its VAE stays in the default memory
            format: its convolutions are 3-D and causal in time, with frames concatenated per call.
        vae_tiling: run the VAE on its own overlapping spatial tiles, as the official pipeline does. On by
            default (`zoo upscale` turns it off where the untiled VAE fits the free memory: `default_options`),
            so the official weights give the official output at every frame size (the tiles are
            blended, and differ from one untiled pass above 240x360 output pixels). Off, the VAE runs whole
            frames: at 720p output the tiles made it encode and decode 20 tiles of 86,400 pixels for 921,600
            (69.3 TFLOP per output frame against 50.3 untiled, counted with `zoo bench`); turn it off where
            speed matters more than the official output and the untiled VAE fits in memory. Untiled, the VAE
            holds far more: 45.7 GiB beyond the weights at 720p output in bfloat16 against 6.0 GiB tiled (the
            `zoo bench` count's estimate), and it decodes at most about 1.68 megapixels per frame
            (`OSDEnhancerVAE.untiled_pixel_limit`: 1088x1920 is refused).

    Args:
        config: the network config (`OSDEnhancerConfig.tiny()` / `.full()` or loaded).
        net: existing networks to run (shared, not copied); built from `config` when None.
    """

    hub_name = "osdenhancer"
    config_class = OSDEnhancerConfig
    options: ClassVar[dict[str, Any]] = {"scale": 4, "temporal_scale": 2, "chunk": 33, "chunk_overlap": 8,
                                         "overlap": "blend", "seed": 0, "compile": False,
                                         "vae_tiling": True}
    temporal_scales = ()  # any int >= 1 (`check_options`)

    def __init__(self, config: OSDEnhancerConfig, net: OSDEnhancerNet | None = None) -> None:
        super().__init__(config)
        self.net = OSDEnhancerNet(config) if net is None else net
        # As the official pipeline: per-sample slices bound the VAE's memory (its tiles are the `vae_tiling` option).
        self.net.vae.enable_slicing()

    def padded_output_size(self, height: int, width: int) -> tuple[int, int]:
        """The frame size the networks run at for `height x width` LR frames: scaled, padded to `SIZE_MULTIPLE`."""
        return tuple(-(-math.floor(side * self.scale) // SIZE_MULTIPLE) * SIZE_MULTIPLE for side in (height, width))

    def estimate_memory(self, height: int, width: int) -> int | None:
        """Peak bytes beyond the weights of one chunk on `height x width` LR frames with the current options.

        From `zoo bench`'s fake-tensor estimates (`UNTILED_VAE_BYTES`, `TILED_VAE_BYTES`,
        `CHUNK_BYTES_PER_PIXEL_FRAME`, or `TINY_BYTES_PER_PIXEL` for the tiny network); None with `chunk=None`,
        whose memory grows with the clip.
        """
        if self.chunk is None:
            return None
        out_h, out_w = self.padded_output_size(height, width)
        pixels = out_h * out_w
        tiny = OSDEnhancerConfig.tiny()
        if (self.net.config.transformer, self.net.config.vae) == (tiny.transformer, tiny.vae):
            fixed, per_frame = TINY_BYTES_PER_PIXEL[4 if torch.finfo(self.dtype).bits >= 32 else 2]
            return pixels * (fixed + per_frame * self.chunk)
        vae = TILED_VAE_BYTES if self.vae_tiling else UNTILED_VAE_BYTES[0] + UNTILED_VAE_BYTES[1] * pixels
        bf16_bytes = vae + CHUNK_BYTES_PER_PIXEL_FRAME * pixels * self.chunk
        return int(bf16_bytes * (torch.finfo(self.dtype).bits // 8) / 2)

    def default_options(self, height: int, width: int, free_bytes: int) -> dict[str, Any]:
        """The untiled VAE (26% fewer FLOPs at 720p output) where it fits `MEMORY_HEADROOM` of `free_bytes` and the
        VAE's pixel limit (`OSDEnhancerVAE.untiled_pixel_limit`), else the official tiles.

        At 720p output in bfloat16 an untiled chunk of 33 frames needs about 46 GiB beyond the weights: an 80 GB
        GPU runs it untiled, a 48 GB one tiled.
        """
        if self.chunk is None:
            return {}
        out_h, out_w = self.padded_output_size(height, width)
        current = self.vae_tiling
        try:
            self.vae_tiling = False
            fits = (out_h * out_w <= self.net.vae.untiled_pixel_limit(self.chunk)
                    and self.estimate_memory(height, width) <= free_bytes * MEMORY_HEADROOM)
        finally:
            self.vae_tiling = current
        return {"vae_tiling": not fits}

    def compile_modules(self) -> list[torch.nn.Module]:
        net = self.net
        return [net.transformer, net.vae.encoder, net.vae.decoder]

    @classmethod
    def from_net(cls, net: OSDEnhancerNet) -> OSDEnhancerUpscaler:
        """An upscaler with a copy of `net`'s weights (the training module's networks)."""
        return cls(net.config, net=copy.deepcopy(net))

    def check_options(self) -> None:
        scale, temporal = self.scale, self.temporal_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale >= 1:
            raise ValueError(f"scale must be a number >= 1, got {scale!r}")
        if isinstance(temporal, bool) or not isinstance(temporal, int) or temporal < 1:
            raise ValueError(f"temporal_scale must be an int >= 1, got {temporal!r}")
        if self.chunk is not None:
            if not isinstance(self.chunk, int) or self.chunk < 9 or valid_length(self.chunk, "8n+1") != self.chunk:
                raise ValueError(f"chunk must be None or 8n + 1 output frames with n >= 1 (9, 17, 25, 33, ...), "
                                 f"got {self.chunk!r}")
            if not isinstance(self.chunk_overlap, int) or not 0 <= self.chunk_overlap < self.chunk:
                raise ValueError(f"chunk_overlap must be an int in [0, chunk={self.chunk}), got "
                                 f"{self.chunk_overlap!r}")
        if self.overlap not in OVERLAP_MODES:
            raise ValueError(f"overlap must be 'blend' or 'drop', got {self.overlap!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.vae_tiling, bool):
            raise ValueError(f"vae_tiling must be True or False, got {self.vae_tiling!r}")

    # Inputs ---------------------------------------------------------------------------------

    def output_rate_frames(self, frames: Iterable[Tensor]) -> Iterator[tuple[Tensor, Tensor, Padding]]:
        """`(I†_in, I^Δ, padding)` per output frame, `(3, H', W')` on the model's device, float32.

        `I†_in` is in [-1, 1]; both are reflect-padded (centred) to multiples of 16 and `padding` says how
        much. Eq. (2) blends the LR frames before upsampling and Eq. (3) differences the upsampled key
        frames, as the official pipeline does.
        """
        scale, num_interpolated = self.scale, self.temporal_scale - 1
        previous = previous_up = None
        for frame in frames:
            check_frame(frame, values=previous is None)  # values once per clip: reading them is a host sync
            if previous is not None and frame.shape != previous.shape:
                raise ValueError(f"every frame of a clip must have one size; got {tuple(frame.shape[-2:])} after "
                                 f"frames of {tuple(previous.shape[-2:])}")
            current = frame.to(self.device, torch.float32)
            current_up = upsample(current, scale)
            key_video, padding = pad_to_multiple(current_up * 2 - 1, SIZE_MULTIPLE, "reflect", centred=True)
            zero = torch.zeros_like(key_video)
            if previous is not None:
                residual, _ = pad_to_multiple(current_up - previous_up, SIZE_MULTIPLE, "reflect", centred=True)
                for k in range(1, num_interpolated + 1):
                    w_left, w_right = interpolation_weights(k, num_interpolated)
                    blend = upsample(w_left * previous + w_right * current, scale)  # Eq. (2), OSDEnhancer
                    video, _ = pad_to_multiple(blend * 2 - 1, SIZE_MULTIPLE, "reflect", centred=True)
                    yield video, residual, padding  # Eq. (3), OSDEnhancer: I^Δ = Up(I_{2n+1}) - Up(I_{2n-1})
            yield key_video, zero, padding  # I^Δ = 0 on key frames (L98)
            previous, previous_up = current, current_up

    def chunks(self, items: Iterable[Any]) -> Iterator[tuple[int, list[Any]]]:
        """`(start, items)` of each chunk of a stream, on the `chunk_starts` schedule, without its length.

        Holds the last `chunk + 1` items: a chunk and one item of look-ahead, which tells whether the clip
        goes on after it; when it ends, its last chunk is among them.
        """
        source = iter(items)
        if self.chunk is None:
            everything = list(source)
            if everything:
                yield 0, everything
            return
        chunk, step = self.chunk, self.chunk - self.chunk_overlap
        window: deque[Any] = deque(maxlen=chunk + 1)
        read = start = 0
        while True:
            while read < start + chunk + 1:
                item = next(source, None)
                if item is None:
                    break
                window.append(item)
                read += 1
            first = read - len(window)  # index of window[0] in the clip
            if read <= start + chunk:  # the clip ends inside this chunk: the last chunk ends with it
                if read:
                    last = max(read - chunk, 0)
                    yield last, list(window)[last - first:]
                return
            yield start, list(window)[start - first : start - first + chunk]
            start += step

    # Running --------------------------------------------------------------------------------

    def upscale_chunk(self, items: list[tuple[Tensor, Tensor, Padding]],
                      generator: torch.Generator | None) -> Tensor:
        """Output frames `(T, 3, sH, sW)` in [0, 1] of one chunk of `output_rate_frames` items."""
        length = len(items)
        padded = valid_length(length, "8n+1")
        video = pad_frames(torch.stack([item[0] for item in items]), padded)
        residual = pad_frames(torch.stack([item[1] for item in items]), padded)
        dtype = self.net.vae.dtype
        if not self.vae_tiling:
            height, width = video.shape[-2:]
            limit = self.net.vae.untiled_pixel_limit(padded)
            if height * width > limit:
                raise ValueError(f"vae_tiling=False cannot run {width}x{height} output frames (padded to multiples "
                                 f"of {SIZE_MULTIPLE}): the untiled CogVideoX VAE decodes at most {limit:,} pixels "
                                 f"per frame here, not {height * width:,}; use vae_tiling=True")
        self.net.vae.use_tiling = self.vae_tiling  # the option as configured now, for this chunk's encode and decode
        decoded = self.compiled("chunk", self.net.upscale_clip)(video.transpose(0, 1)[None].to(dtype),
                                                                residual.transpose(0, 1)[None].to(dtype), generator)
        frames = items[0][2].crop(decoded[0, :, :length].transpose(0, 1)).float()
        return (frames * 0.5 + 0.5).clamp(0, 1)  # to [0, 1] in float32 (bfloat16 steps by 1/256 below 1)

    def default_generator(self) -> torch.Generator:
        """A generator on the model's device seeded with the `seed` option."""
        return torch.Generator(self.device).manual_seed(self.seed)

    @torch.no_grad()
    def stream(self, frames: Iterable[Tensor], generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Upscale frames `(3, H, W)` in [0, 1] arriving one at a time; yields `(3, sH, sW)` on the model's device.

        Args:
            frames: the input frames.
            generator: noise of the posterior samples, drawn per chunk in order (video latents, then residual
                latents); a generator on the model's device seeded with S reproduces the official pipeline
                after `torch.manual_seed(S)`. None: a fresh one seeded with the `seed` option.
        """
        generator = self.default_generator() if generator is None else generator
        drop = self.overlap == "drop"
        emitted = 0  # output frames yielded so far
        waiting: tuple[int, Tensor] | None = None  # a blended chunk's (start, frames) until its successor's start
        previous_stop = 0  # end of the chunk before `waiting`
        canvas: list[Tensor] = []  # running means of output frames [emitted, ...) not final yet
        weights: list[float] = []
        any_chunk = False
        for start, items in self.chunks(self.output_rate_frames(frames)):
            any_chunk = True
            out = self.upscale_chunk(items, generator)
            if drop:  # the earlier chunk's frames win
                yield from out[emitted - start:].unbind(0)
                emitted = start + len(out)
                continue
            if waiting is not None:
                yield from self._settle(waiting, previous_stop, start, canvas, weights, emitted)
                emitted, previous_stop = start, waiting[0] + len(waiting[1])
            waiting = (start, out)
        if waiting is not None:
            yield from self._settle(waiting, previous_stop, None, canvas, weights, emitted)
        if not any_chunk:
            raise ValueError("frames must hold at least one frame, got none")

    @staticmethod
    def _settle(chunk: tuple[int, Tensor], previous_stop: int, next_start: int | None, canvas: list[Tensor],
                weights: list[float], emitted: int) -> Iterator[Tensor]:
        """Blend a chunk into `canvas` now that its neighbours are known and yield the frames now final.

        The chunk's weight ramps up over its overlap with the previous chunk and down over its overlap
        with the next one (`crossfade`); each canvas frame is the running weighted mean of the chunks on it.
        """
        start, out = chunk
        stop = start + len(out)
        chunk_weights = [1.0] * len(out)
        if previous_stop > start:
            for i, w in enumerate(crossfade(previous_stop - start)):
                chunk_weights[i] *= w
        if next_start is not None and stop > next_start:
            for i, w in enumerate(reversed(crossfade(stop - next_start))):
                chunk_weights[next_start - start + i] *= w
        while emitted + len(canvas) < stop:
            canvas.append(torch.zeros_like(out[0]))
            weights.append(0.0)
        for i, (frame, w) in enumerate(zip(out, chunk_weights)):
            j = start + i - emitted
            weights[j] += w
            canvas[j] = torch.lerp(canvas[j], frame, w / weights[j])
        final = len(canvas) if next_start is None else next_start - emitted
        yield from canvas[:final]
        del canvas[:final], weights[:final]

    @torch.no_grad()
    def forward(self, frames: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Upscale a clip `(N, 3, H, W)` in [0, 1]; returns `((N - 1) * temporal_scale + 1, 3, sH, sW)`."""
        check_frames(frames)
        return torch.stack(list(self.stream(frames.unbind(0), generator=generator)))

    # Hub folders ----------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the official layout plus the zoo's `config.json`.

        `transformer/` holds the diffusers config of `OSDEnhancerTransformer` (the experts' ranks included)
        and one safetensors file whose keys are the official ones (the SE adapter in peft's layout
        `<layer>.base_layer.weight`, `<layer>.lora_A.TE_lora.weight`, ...).
        """
        self.check_exportable()
        folder = Path(folder)
        net = self.net
        (folder / "transformer").mkdir(parents=True, exist_ok=True)
        net.transformer.save_config(folder / "transformer")
        save_file(cpu_state(net.transformer.state_dict()), folder / "transformer" / TRANSFORMER_WEIGHTS,
                  metadata={"format": "pt"})
        net.vae.save_pretrained(folder / "vae")
        net.scheduler.save_pretrained(folder / "scheduler")
        (folder / PROMPT_FILE).parent.mkdir(exist_ok=True)
        save_file({PROMPT_KEY: net.prompt_embedding[0].detach().cpu().contiguous()}, folder / PROMPT_FILE)
        self.write_config(folder, {key: getattr(self.config, key) for key in ZOO_SETTINGS})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> OSDEnhancerUpscaler:
        """Build from an official or exported folder, every weight matching strictly.

        The two kinds of folder hold the same keys and differ in what the SE adapter `TE_lora` means:

        - Official checkpoints (no root `config.json`). The official loader wraps the transformer with peft,
          calls `merge_adapter()` on freshly initialised random `TE_lora` weights, which flags every adapted
          layer as merged, and then `load_state_dict(strict=False)` overwrites `base_layer.weight` and the
          `TE_lora` tensors with the file's. A merged layer's forward is `base_layer(x)`, so the file's
          `TE_lora` tensors are loaded but never used: the official function is the plain linear layer with
          `base_layer.weight`. (Disabling the adapters afterwards would unmerge, giving `W - B A`.) This
          loader reproduces that function: it builds the transformer without the SE adapter, loads
          `base_layer.weight` / `base_layer.bias` as the layers' own weights and drops the `TE_lora`
          tensors after checking that every adapted layer has them.
        - Folders the zoo exports (root `config.json` with hub name `osdenhancer`). The SE expert the zoo
          trained is stored in the same layout and applied once, `W z + B_SE A_SE z` (Eq. 7), with the ranks
          of `transformer/config.json`.
        """
        folder = Path(folder)
        settings = cls.read_config_data(folder, required=False)
        official = settings is None
        settings = settings or {}
        unknown = sorted(set(settings) - set(ZOO_SETTINGS))
        if unknown:
            raise ValueError(f"{folder}/config.json has unknown setting(s) {', '.join(unknown)}")
        if not (folder / "transformer" / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a complete weights folder: transformer/config.json is missing")
        transformer_config = OSDEnhancerTransformer.load_config(folder / "transformer")
        with torch.device("meta"):
            transformer = OSDEnhancerTransformer.from_config(transformer_config, **({"se_rank": 0} if official else {}))
        state = read_transformer_state(folder / "transformer")
        if official:
            state = official_transformer_state(state)
        load_strict(transformer, {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                    source=f"{folder}/transformer", assign=True)
        vae = from_pretrained_strict(OSDEnhancerVAE, folder, "vae")
        if not (folder / "scheduler" / "scheduler_config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a complete weights folder: scheduler/scheduler_config.json "
                                    f"is missing")
        scheduler = CogVideoXDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        prompts = read_safetensors(folder / PROMPT_FILE)
        if PROMPT_KEY not in prompts or prompts[PROMPT_KEY].ndim != 2:
            raise ValueError(f"{folder / PROMPT_FILE} must hold '{PROMPT_KEY}', an (L, D) embedding")
        prompt = prompts[PROMPT_KEY].float()[None]
        resolved = _public(transformer.config)
        config = OSDEnhancerConfig(
            transformer={k: v for k, v in resolved.items() if k not in EXPERT_KEYS}, vae=_public(vae.config),
            scheduler=_public(scheduler.config), prompt_length=prompt.shape[1],
            **{key: resolved[key] for key in EXPERT_KEYS}, **settings,
        )
        return cls(config, net=OSDEnhancerNet.from_components(config, transformer, vae, scheduler, prompt))


def read_transformer_state(folder: Path) -> dict[str, Tensor]:
    """All tensors of a transformer folder: the shards its index names, else its one safetensors file."""
    index = folder / TRANSFORMER_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [TRANSFORMER_WEIGHTS]
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(read_safetensors(folder / name))
    return state


def official_transformer_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official transformer's weights as the function the official loader computes (see `from_pretrained`).

    `<layer>.base_layer.{weight,bias}` become `<layer>.{weight,bias}`; `<layer>.lora_{A,B}.TE_lora.weight`
    are dropped, after checking that exactly the layers with a `base_layer` have both.
    """
    adapted = {key.split(".base_layer.")[0] for key in state if ".base_layer." in key}
    factors: dict[str, set[str]] = {}
    out = {}
    for key, value in state.items():
        for factor in ("lora_A", "lora_B"):
            marker = f".{factor}.{SE_ADAPTER}."
            if marker in key:
                factors.setdefault(key.split(marker)[0], set()).add(factor)
                break
        else:
            out[key.replace(".base_layer.", ".")] = value
    complete = {layer for layer, found in factors.items() if found == {"lora_A", "lora_B"}}
    if complete != adapted or set(factors) != adapted:
        odd = sorted(adapted ^ complete | set(factors) - complete)
        raise ValueError(f"the official transformer must hold {SE_ADAPTER} lora_A and lora_B for exactly its peft "
                         f"base layers; {len(odd)} layer(s) differ, e.g. {odd[0]}")
    return out


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON-able data without its private (`_`) keys."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}
