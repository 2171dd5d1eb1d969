"""`python launch.py ARGS` runs `zoo ARGS` with the test model "bicubic" registered.

`zoo predict ...` is `lightning predict ...`; Lightning's DDP launcher starts each further rank by
re-running this script with the same arguments, so every rank registers the model too.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bicubic_upscaler

from zoo.cli import zoo_main

if __name__ == "__main__":
    bicubic_upscaler.register()
    zoo_main(sys.argv[1:])
