"""Running launch/train.py in subprocesses, one or several (DDP on CPU through accelerate launch)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(args, num_processes=1, env=None, timeout=600):
    """accelerate launch [--multi_gpu --num_processes N] launch/train.py --cpu ARGS -> CompletedProcess."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        # On CPU, `--cpu --num_processes 2` silently starts one process: --multi_gpu plus --cpu for the
        # script (Accelerator(cpu=True)) starts N gloo processes.
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
    else:
        command += ["--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                str(REPO / "launch" / "train.py"), "--cpu", *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=full_env)


def finished(result, output_dir: Path) -> bool:
    """The run did all its work. gloo sometimes aborts at interpreter exit after the work is done: such a
    run counts as finished only if it wrote its metrics and printed its final line before the abort."""
    if result.returncode == 0:
        return True
    done = (Path(output_dir) / "metrics.json").is_file() and "test accuracy" in result.stdout
    teardown = "gloo" in result.stderr.lower() or "terminate called" in result.stderr
    return done and teardown
