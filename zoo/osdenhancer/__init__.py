"""OSDEnhancer: "Taming Real-World Space-Time Video Super-Resolution with One-Step Diffusion" (Shuoyan Wei,
Feng Li, Chen Zhou, Runmin Cong, Yao Zhao, Huihui Bai; arXiv:2601.20308). A low-resolution, low-frame-rate video
is linearly pre-interpolated in time and bilinearly upsampled in space, encoded together with its temporal
residuals by the CogVideoX1.5 VAE, denoised in ONE v-prediction step of the CogVideoX1.5-5B transformer carrying
a temporal-refinement and a spatial-enhancement LoRA expert, and decoded by a VAE decoder with bidirectional
deformable recurrent blocks. Official weights (`W-Shuoyan/OSDEnhancer`) load strictly and reproduce the official
pipeline. The training code (`module`, `callbacks`, `data`) is imported on demand, not here.
"""

from zoo.osdenhancer.network import OSDEnhancerConfig, OSDEnhancerNet, OSDEnhancerTransformer, OSDEnhancerVAE
from zoo.osdenhancer.pipeline import OSDEnhancerUpscaler

__all__ = ["OSDEnhancerConfig", "OSDEnhancerNet", "OSDEnhancerTransformer", "OSDEnhancerUpscaler", "OSDEnhancerVAE"]
