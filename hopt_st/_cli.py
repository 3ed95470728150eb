"""The ``hopt-st`` command line."""

import sys


def main(argv=None):
    print("hopt-st: not yet implemented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
