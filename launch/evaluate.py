"""Entry point: `python launch/evaluate.py PATH [flags]`, the same as `python -m sgan.evaluate`. See --help."""
import sys

from sgan.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
