"""vsr-zoo: diffusion-based video super-resolution models behind one interface.

```python
import zoo

up = zoo.load("stream_diffvsr")
video = zoo.read_video("in.mp4")
hr = up(video.frames)
zoo.write_video("out.mp4", hr, fps=video.info.fps, audio_from="in.mp4")
```
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Attribute -> module that defines it. Imported on first use so `import zoo` and `zoo --help`
# stay fast and the hub code never pulls in the training stack.
_EXPORTS = {
    "load": "zoo.hub",
    "list_models": "zoo.hub",
    "read_video": "zoo.components.video_io",
    "write_video": "zoo.components.video_io",
    "iter_frames": "zoo.components.video_io",
    "upscale_video": "zoo.upscale",
    "VideoUpscaler": "zoo.components.upscaler",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
