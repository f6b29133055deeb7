"""Entry point: `accelerate launch launch/train.py [flags]` (or plain `python launch/train.py`). See --help."""
import os
import signal
import sys

from sgan.train import main


def stop_with_the_launcher() -> None:
    """Under `accelerate launch`, a SIGTERM to the launcher ends it without passing the signal on, which left
    this process training to the end, an orphan. Ask Linux for a SIGTERM when the launcher dies: the run then
    checkpoints and exits as if it had been signalled itself. (Not when started by hand: a run under nohup
    must outlive its shell.)"""
    if not sys.platform.startswith("linux") or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the request: stop now
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    stop_with_the_launcher()
    sys.exit(main())
