"""The ``peftkit`` command line (filled by the training-engine issue)."""

import sys


def main(argv=None) -> int:
    print("peftkit: the command line is not built yet", file=sys.stderr)
    return 2
