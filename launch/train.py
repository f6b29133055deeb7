"""Entry point: `accelerate launch launch/train.py [flags]` (or plain `python launch/train.py`). See --help."""
import sys

from sgan.train import main

if __name__ == "__main__":
    sys.exit(main())
