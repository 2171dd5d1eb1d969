"""Training losses shared by the papers: perceptual (LPIPS, DISTS), Charbonnier, masked warp,
temporal residual, adversarial (non-saturating, hinge) and variational score distillation.

Images are `(N, 3, H, W)` in `[0, 1]` unless stated otherwise; clips are `(B, T, C, H, W)`.
Flows follow `zoo.components.flow`: `warp(previous, flow)` samples `previous` at `p + flow(p)`,
so `flow` goes from the current frame to the previous one.

LPIPS (Zhang et al., CVPR 2018) and DISTS (Ding et al., TPAMI 2020) are written here as small
modules over torchvision backbones, so they build without a download (`pretrained=False`, for
tests) and load the published weights with `torch.load(weights_only=True)`. The learned heads are
the files pyiqa publishes in the Hugging Face repo `chaofengc/IQA-PyTorch-Weights`; the ImageNet
backbones are torchvision's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models import AlexNet_Weights, VGG16_Weights, alexnet, vgg16

from zoo.components.flow import warp

IQA_WEIGHTS_REPO = "chaofengc/IQA-PyTorch-Weights"
"""Hugging Face repo where pyiqa publishes the LPIPS / DISTS heads (and its other metric weights)."""

LPIPS_HEAD_FILES = {"alex": "LPIPS_v0.1_alex-df73285e.pth", "vgg": "LPIPS_v0.1_vgg-a78928a0.pth"}
DISTS_HEAD_FILE = "DISTS_weights-f5e65c96.pth"


def pyiqa_cache_dir() -> Path:
    """Where pyiqa keeps downloaded weights: `torch.hub.get_dir()/pyiqa` (moves with `TORCH_HOME`)."""
    return Path(torch.hub.get_dir()) / "pyiqa"


# Weights --------------------------------------------------------------------------------------


def _load_state_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    # The published heads are plain tensor dicts: the restricted unpickler reads them.
    return torch.load(path, map_location="cpu", weights_only=True)


def _find_head(filename: str, weights_path: str | Path | None) -> tuple[Path | None, str | None]:
    """Path of a pyiqa head file, or `None` and why it is missing.

    Looks at `weights_path`, else pyiqa's cache dir (a file pyiqa downloaded before), else the
    Hugging Face cache / Hub (`hf_hub_download`, which honours `HF_HUB_OFFLINE`).
    """
    if weights_path is not None:
        path = Path(weights_path)
        return (path, None) if path.is_file() else (None, f"weights_path {path} does not exist")
    cached = pyiqa_cache_dir() / filename
    if cached.is_file():
        return cached, None
    try:
        return Path(hf_hub_download(IQA_WEIGHTS_REPO, filename)), None
    except LocalEntryNotFoundError:
        return None, (
            f"{filename} is neither in {cached.parent} (pyiqa's cache) nor downloadable from the Hub repo "
            f"{IQA_WEIGHTS_REPO} (HF_HUB_OFFLINE or no network); put it there or pass weights_path=PATH"
        )


def _backbone_state(weights: AlexNet_Weights | VGG16_Weights) -> tuple[dict[str, Tensor] | None, str | None]:
    """torchvision's ImageNet weights (its cache, else a download unless offline), or `None` and why not."""
    filename = weights.url.rsplit("/", 1)[-1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    missing = f"{filename} is not in {folder} (torchvision's cache, moves with TORCH_HOME)"
    if not (folder / filename).is_file() and hf_constants.HF_HUB_OFFLINE:
        return None, f"{missing} and HF_HUB_OFFLINE is set"
    try:
        return weights.get_state_dict(progress=False, check_hash=True), None
    except URLError:
        return None, f"{missing} and cannot be downloaded"


def _build_features(net: str) -> nn.Sequential:
    """The convolutional trunk of torchvision's AlexNet / VGG16, randomly initialised.

    Built on `meta` and materialised here so the unused classifier (most of the parameters)
    never costs an initialisation.
    """
    with torch.device("meta"):
        features = (alexnet() if net == "alex" else vgg16()).features
    features = features.to_empty(device="cpu")
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return features


def _load_pretrained(
    metric: str,
    features: nn.Sequential,
    backbone: AlexNet_Weights | VGG16_Weights,
    head_file: str,
    weights_path: str | Path | None,
) -> dict[str, Tensor]:
    """Load the ImageNet trunk into `features` and return the head's state dict; one error for all that is missing."""
    head_path, head_missing = _find_head(head_file, weights_path)
    trunk, trunk_missing = _backbone_state(backbone)
    missing = [reason for reason in (head_missing, trunk_missing) if reason is not None]
    if missing:
        reasons = "; ".join(missing)
        raise FileNotFoundError(f"{metric} weights are missing: {reasons} (or build it with pretrained=False)")
    features.load_state_dict({k.removeprefix("features."): v for k, v in trunk.items() if k.startswith("features.")})
    return _load_state_file(head_path)


# Perceptual distances --------------------------------------------------------------------------

_LPIPS_SLICES = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
_LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_LPIPS_BACKBONES = {"alex": AlexNet_Weights.IMAGENET1K_V1, "vgg": VGG16_Weights.IMAGENET1K_V1}


def _weighted_spatial_mean(value: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of `value (N, 1, h, w)` over space, weighted by `weight (N, 1, H, W)` resized to `(h, w)`."""
    if weight is None:
        return value.mean((1, 2, 3))
    weight = F.interpolate(weight, size=value.shape[-2:], mode="bilinear", align_corners=False)
    return (value * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3))


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al., CVPR 2018): learned distance between deep features.

    d(x, y) = sum_l mean_hw( w_l · (f̂_l(x) - f̂_l(y))^2 ), where f̂_l are the backbone's activations
    at layer l normalised to unit length over channels and w_l a non-negative 1x1 linear layer.
    The backbone sees `(2 x - 1 - shift) / scale` with LPIPS's fixed shift/scale.

    Args:
        net: backbone, `"alex"` (the usual metric) or `"vgg"` (the usual training loss).
        pretrained: load torchvision's ImageNet trunk and the published linear heads (keys
            `lin{l}.model.1.weight`); `False` keeps a random trunk and uniform heads `1 / C_l`
            (a valid, untrained distance for tests).
        weights_path: the head file (`.pth` or `.safetensors`) instead of pyiqa's cache / the Hub.
    """

    def __init__(self, net: str = "alex", pretrained: bool = True, weights_path: str | Path | None = None) -> None:
        super().__init__()
        if net not in _LPIPS_SLICES:
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        features = _build_features(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS[net])
        for lin, channels in zip(self.lins, _LPIPS_CHANNELS[net]):
            nn.init.constant_(lin.weight, 1 / channels)
        if pretrained:
            head = _load_pretrained(
                f"LPIPS ({net})", features, _LPIPS_BACKBONES[net], LPIPS_HEAD_FILES[net], weights_path
            )
            with torch.no_grad():
                for index, lin in enumerate(self.lins):
                    lin.weight.copy_(head[f"lin{index}.model.1.weight"])
        bounds = (0, *_LPIPS_SLICES[net])
        self.slices = nn.ModuleList(features[start:stop] for start, stop in itertools.pairwise(bounds))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _features(self, image: Tensor) -> list[Tensor]:
        hidden = ((2 * image - 1) - self.shift) / self.scale
        outputs = []
        for block in self.slices:
            hidden = block(hidden)
            # eps inside the root keeps the gradient finite where a feature vector is all zero.
            outputs.append(hidden / torch.sqrt(hidden.square().sum(1, keepdim=True) + 1e-20))
        return outputs

    def forward(self, x: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
        """Distances `(N,)` between `x` and `y`, `(N, 3, H, W)` in `[0, 1]`.

        Args:
            x: first images.
            y: second images.
            weight: optional non-negative `(N, 1, H, W)` map; each layer's spatial mean becomes a
                mean weighted by it, resized bilinearly to the layer (FloLPIPS).
        """
        total = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self._features(x), self._features(y)):
            total = total + _weighted_spatial_mean(lin((fx - fy).square()), weight)
        return total


def _l2_pool_filter(channels: int) -> Tensor:
    # 5-tap Hann window without its zero ends: [0.5, 1, 0.5], outer product, normalised.
    taps = torch.tensor([0.5, 1.0, 0.5])
    kernel = taps[:, None] * taps[None, :]
    return (kernel / kernel.sum()).expand(channels, 1, 3, 3).clone()


class _L2Pool(nn.Module):
    """DISTS's L2 pooling: sqrt(blur(x^2)) with stride 2, replacing VGG's max pooling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("kernel", _l2_pool_filter(channels), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.conv2d(x.square(), self.kernel, stride=2, padding=1, groups=x.shape[1])
        return torch.sqrt(pooled + 1e-12)


class DISTS(nn.Module):
    """DISTS (Ding et al., TPAMI 2020): structure and texture similarity of VGG16 features.

    With x̃_j, ỹ_j the j-th channel of stage i (stage 0 is the image itself), means μ, variances
    σ², covariance σ_xy over space, and c1 = c2 = 1e-6:

        D(x, y) = 1 - sum_ij ( α_ij (2 μx μy + c1) / (μx² + μy² + c1)
                             + β_ij (2 σ_xy + c2) / (σx² + σy² + c2) ) / sum_ij (α_ij + β_ij)

    Args:
        pretrained: load torchvision's VGG16 and the published α, β (keys `alpha`, `beta`);
            `False` keeps a random trunk and α = β = 0.1 everywhere.
        weights_path: the α/β file instead of pyiqa's cache / the Hub.
    """

    channels = (3, 64, 128, 256, 512, 512)

    def __init__(self, pretrained: bool = True, weights_path: str | Path | None = None) -> None:
        super().__init__()
        features = _build_features("vgg")
        self.alpha = nn.Parameter(torch.full((1, sum(self.channels), 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, sum(self.channels), 1, 1), 0.1))
        if pretrained:
            head = _load_pretrained("DISTS", features, VGG16_Weights.IMAGENET1K_V1, DISTS_HEAD_FILE, weights_path)
            with torch.no_grad():
                self.alpha.copy_(head["alpha"].view_as(self.alpha))
                self.beta.copy_(head["beta"].view_as(self.beta))
        # VGG16's max pools sit at 4, 9, 16, 23; DISTS puts an L2 pool in each place.
        self.stages = nn.ModuleList(
            [
                features[0:4],
                nn.Sequential(_L2Pool(64), *features[5:9]),
                nn.Sequential(_L2Pool(128), *features[10:16]),
                nn.Sequential(_L2Pool(256), *features[17:23]),
                nn.Sequential(_L2Pool(512), *features[24:30]),
            ]
        )
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _features(self, image: Tensor) -> list[Tensor]:
        outputs = [image]
        hidden = (image - self.mean) / self.std
        for stage in self.stages:
            hidden = stage(hidden)
            outputs.append(hidden)
        return outputs

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distances `(N,)` between `x` and `y`, `(N, 3, H, W)` in `[0, 1]`."""
        c1 = c2 = 1e-6
        total_weight = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / total_weight, self.channels, dim=1)
        betas = torch.split(self.beta / total_weight, self.channels, dim=1)
        similarity = x.new_zeros(x.shape[0])
        for alpha, beta, fx, fy in zip(alphas, betas, self._features(x), self._features(y)):
            mean_x, mean_y = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
            var_x = (fx - mean_x).square().mean((2, 3), keepdim=True)
            var_y = (fy - mean_y).square().mean((2, 3), keepdim=True)
            cov = (fx * fy).mean((2, 3), keepdim=True) - mean_x * mean_y
            structure = (2 * mean_x * mean_y + c1) / (mean_x.square() + mean_y.square() + c1)
            texture = (2 * cov + c2) / (var_x + var_y + c2)
            similarity = similarity + (alpha * structure + beta * texture).sum((1, 2, 3))
        return 1 - similarity


class PerceptualLoss(nn.Module):
    """LPIPS or DISTS as a training loss: the batch mean of the distance, gradients to the input.

    The network is frozen; gradients flow only into the images.

    Args:
        kind: `"lpips"` or `"dists"`.
        net: LPIPS backbone, `"vgg"` (the usual choice for training) or `"alex"`; DISTS is VGG16 only.
        pretrained: load the published weights (see `LPIPS` / `DISTS`); `False` for tests.
        weights_path: the head file, instead of pyiqa's cache / the Hub.
    """

    def __init__(
        self, kind: str = "lpips", net: str = "vgg", pretrained: bool = True, weights_path: str | Path | None = None
    ) -> None:
        super().__init__()
        if kind == "lpips":
            self.distance = LPIPS(net, pretrained=pretrained, weights_path=weights_path)
        elif kind == "dists":
            if net != "vgg":
                raise ValueError(f"DISTS is built on VGG16 only, got net={net!r}")
            self.distance = DISTS(pretrained=pretrained, weights_path=weights_path)
        else:
            raise ValueError(f"kind must be 'lpips' or 'dists', got {kind!r}")

    def train(self, mode: bool = True) -> PerceptualLoss:
        # The distance is frozen: a parent switching to train mode must not enable its dropout/BN.
        super().train(mode)
        self.distance.eval()
        return self

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean distance between `x` and `y`, `(N, 3, H, W)` in `[0, 1]`."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x and y must be (N, 3, H, W) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        return self.distance(x, y).mean()


# Pixel and temporal losses ---------------------------------------------------------------------


def charbonnier_loss(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    """Charbonnier loss `mean( sqrt((x - y)^2 + eps^2) )`, a smooth L1 (Lai et al., LapSRN 2017).

    Args:
        x: prediction.
        y: target, same shape.
        eps: smoothing; the loss is `eps` (not 0) where `x == y`.
    """
    return torch.sqrt((x - y).square() + eps**2).mean()


def masked_warp_loss(
    current: Tensor,
    previous: Tensor,
    flow: Tensor,
    mask: Tensor | None = None,
    high_pass: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Warping loss `sum(M · |I_t - W(I_{t-1})|) / (C · sum(M))`: the L1 error over visible pixels.

    `W(I_{t-1}) = warp(previous, flow)` brings the previous frame onto the current one, so `flow`
    goes from the current frame to the previous one (`flow_fn(current, previous)`).

    Args:
        current: `I_t`, `(N, C, H, W)`.
        previous: `I_{t-1}`, `(N, C, H, W)`.
        flow: `(N, 2, H, W)` from `current` to `previous`, in pixels.
        mask: `M`, `(N, 1, H, W)`, 1 where the pixel is visible in both frames (e.g.
            `flow.valid_mask`); `None` uses every pixel.
        high_pass: if given, compare `high_pass(I_t)` with `high_pass(W(I_{t-1}))`, the
            high-frequency components only (e.g. a filter from `zoo.components.color`).

    Returns:
        Scalar loss; 0 where the mask is empty.
    """
    warped = warp(previous, flow)
    if high_pass is not None:
        current, warped = high_pass(current), high_pass(warped)
    error = (current - warped).abs()
    if mask is None:
        return error.mean()
    if mask.shape != (current.shape[0], 1, *current.shape[-2:]):
        raise ValueError(f"mask must be (N, 1, H, W) for images {tuple(current.shape)}, got {tuple(mask.shape)}")
    return (error * mask).sum() / (current.shape[1] * mask.sum()).clamp_min(1e-8)


def temporal_residual_loss(x: Tensor, y: Tensor) -> Tensor:
    """Temporal residual loss `mean |(x_{j+1} - x_j) - (y_{j+1} - y_j)|` (L1, mean over all entries).

    Matches the frame-to-frame changes of a prediction `x` to those of a target `y`, in pixel or
    latent space. The L1 mean over batch, time pairs, channels and positions is the norm used.

    Args:
        x: prediction `(B, T, C, H, W)`, `T >= 2`.
        y: target, same shape.
    """
    if x.shape != y.shape or x.ndim != 5 or x.shape[1] < 2:
        raise ValueError(
            f"x and y must be (B, T, C, H, W) of one shape with T >= 2, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return (x.diff(dim=1) - y.diff(dim=1)).abs().mean()


# Adversarial losses -----------------------------------------------------------------------------


def nonsaturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator loss `mean softplus(-D(real)) + mean softplus(D(fake))` (Goodfellow et al., 2014)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss `mean softplus(-D(fake))`."""
    return F.softplus(-fake_logits).mean()


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge discriminator loss `mean relu(1 - D(real)) + mean relu(1 + D(fake))` (Lim & Ye, 2017)."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Hinge generator loss `-mean D(fake)`."""
    return -fake_logits.mean()


# Score distillation ------------------------------------------------------------------------------


def vsd_loss(latents: Tensor, phi_reg_pred: Tensor, phi_lora_pred: Tensor, weight: Tensor | float) -> Tensor:
    """Variational score distillation (Wang et al., ProlificDreamer 2023) through a stop-gradient target.

    With `g = w(t) (φ_reg - φ_lora)` and the constant target `z* = sg(z - g)`,

        L = 0.5 · ||z - z*||² / B,   so   dL/dz = g / B  exactly,

    where `B = latents.shape[0]`: the gradient of the batch-mean loss is the VSD direction of each
    sample divided by the batch size. No gradient reaches `φ_reg` or `φ_lora` through this loss.

    Args:
        latents: `z`, the generator's latents `(B, ...)`, carrying the graph to the generator.
        phi_reg_pred: the frozen (regularising) diffusion model's prediction, shape of `latents`.
        phi_lora_pred: the LoRA / fake-score model's prediction, shape of `latents`.
        weight: `w(t)`, a float or a tensor broadcastable to `latents` (e.g. `(B, 1, 1, 1)`).
    """
    if phi_reg_pred.shape != latents.shape or phi_lora_pred.shape != latents.shape:
        raise ValueError(
            f"predictions must have the shape of latents {tuple(latents.shape)}, "
            f"got {tuple(phi_reg_pred.shape)} and {tuple(phi_lora_pred.shape)}"
        )
    gradient = weight * (phi_reg_pred - phi_lora_pred)
    target = (latents - gradient).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum") / latents.shape[0]
