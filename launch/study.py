"""Entry point: `python launch/study.py [flags]`, the same as `python -m sgan.study`. See --help."""
import sys

from sgan.study import main

if __name__ == "__main__":
    sys.exit(main())
