"""python -m densemoe: entry points (benchmarks live in ``python -m densemoe.bench``)."""

import sys


def main() -> int:
    print("usage: python -m densemoe.bench {fc2,sweep,plot} ...  (see --help)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
