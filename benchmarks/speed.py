"""Teacher vs student end-to-end speed, side by side in one run (the same as ``anytext2-lcm bench``).

    python benchmarks/speed.py                                   # sd15 architecture, random weights, 256 px
    python benchmarks/speed.py --size 512 --device cuda --dtype fp16
    python benchmarks/speed.py --variants "channels_last;vae_bf16;tiny_decoder;bf16"

See ``anytext2_lcm.evaluate.bench`` for what is timed and how.
"""

import sys

from anytext2_lcm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
