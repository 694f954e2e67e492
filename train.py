"""Train a model: `python train.py CONFIG [key=value ...]` (same as `ldm train`); no arguments runs the quickstart."""

import sys

from ldm.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["train", *args] if args else ["quickstart"]))
