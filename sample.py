"""Sample a trained generator: `python sample.py RUN_DIR [options]` (same as `ldm sample`; --help lists the options).

    python sample.py runs/dit_s2 --num 50000 --cfg 1.5 --npz --out samples/dit_s2
    torchrun --nproc_per_node 8 sample.py runs/dit_s2 -n 50000 --npz --out samples/dit_s2   (sharded)
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
