"""OS-DiffVSR: "Towards One-step Latent Diffusion Model for High-detailed Real-world Video Super-Resolution"
(Hanting Li, Huaao Tang, Jianhong Han, Tianxiong Zhou, Jiulong Cui, Haizhen Xie, Yan Chen, Jie Hu; Huawei
Noah's Ark Lab, arXiv:2509.16507). Each LR frame is bicubic-upsampled, VAE-encoded and denoised by ONE step
of an SD-2.1 UNet with LoRA (built on OSEDiff), after its latent has been fused with the latents of the
flow-warped previous and next frames (multi-frame fusion); training adds an adjacent-frame adversarial loss
from a DINOv2 discriminator and a focal MSE. No official code or weights exist: this package is the zoo's
reference implementation. The training code (`module`, `callbacks`, `data`) is imported on demand, not here.
"""

from zoo.osdiffvsr.network import OSDiffVSRConfig, OSDiffVSRNet
from zoo.osdiffvsr.pipeline import OSDiffVSRUpscaler

__all__ = ["OSDiffVSRConfig", "OSDiffVSRNet", "OSDiffVSRUpscaler"]
