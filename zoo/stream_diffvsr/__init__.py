"""Stream-DiffVSR: "Low-Latency Streamable Video Super-Resolution via Auto-Regressive Diffusion"
(Hau-Shiang Shiu, Chin-Yang Lin, Zhixiang Wang, Chi-Wei Hsiao, Po-Fan Yu, Yu-Chih Chen, Yu-Lun Liu).

A causal x4 video upscaler: each frame is denoised in 4 DDIM steps by the SD x4 upscaler UNet (distilled
by rollout distillation), guided by a ControlNet (Auto-regressive Temporal Guidance, ARTG) that sees the
previous HR output warped onto the current frame by optical flow, and decoded by a tiny temporal-aware
decoder whose Temporal Processor Modules (TPM) fuse features of that warped previous output. Only the
previous frame is kept, so memory is constant in the video's length and the first output follows the
first input. The training code (`module`, `callbacks`, `data`) is imported on demand, not here.
"""

from zoo.stream_diffvsr.network import StreamDiffVSRConfig, StreamDiffVSRNet, TemporalAutoencoderTiny
from zoo.stream_diffvsr.pipeline import StreamDiffVSRUpscaler, StreamSession

__all__ = ["StreamDiffVSRConfig", "StreamDiffVSRNet", "StreamDiffVSRUpscaler", "StreamSession",
           "TemporalAutoencoderTiny"]
