"""``python -m peftkit`` (and ``accelerate launch -m peftkit`` / ``torchrun -m peftkit``): the command line."""

import sys

from peftkit.train.cli import main

sys.exit(main())
