"""`python -m ldm.cli ...` (also under `accelerate launch -m ldm.cli` and `torchrun -m ldm.cli`)."""

import sys

from ldm.cli import main

sys.exit(main())
