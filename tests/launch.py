"""`python launch.py ARGS` runs `zoo ARGS` with the test model "bicubic" registered.

`zoo predict ...` is `lightning predict ...`; Lightning's DDP launcher starts each further rank by
re-running this script with the same arguments, so every rank registers the model too.
"""

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bicubic_upscaler

from zoo.cli import zoo_main

if __name__ == "__main__":
    # As from a terminal: a test suite started as a background job (`pytest ... &`) inherits an ignored SIGINT,
    # and Python then installs no KeyboardInterrupt handler, while the signal tests send SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    bicubic_upscaler.register()
    zoo_main(sys.argv[1:])
