"""PS-SR: "PS-SR: Pseudo-Single-Step Video Super-Resolution via Speculative Diffusion" (Aiqiu Wu, Zhaofan Qiu,
Ting Yao, Tao Mei; USTC and HiDream.ai). The bicubic-upsampled LR video is encoded by the Wan2.1 VAE; a LoRA-tuned
Wan2.1-T2V-1.3B DiT (the base) takes ONE flow step from it, and a pruned copy (the draft, 10 of 30 blocks, each
fused with the base's features) takes the remaining steps, each adding only the high-frequency luminance of its
prediction to the base's output (the frequency-domain update). No official code or weights exist: this package is
the zoo's reference implementation. The training code (`module`, `callbacks`, `data`) is imported on demand, not here.
"""

from zoo.pssr.network import PSSRConfig, PSSRNet
from zoo.pssr.pipeline import PSSRUpscaler

__all__ = ["PSSRConfig", "PSSRNet", "PSSRUpscaler"]
