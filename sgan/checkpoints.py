"""Checkpoints: accelerate's save_state plus a small JSON trainer state, written last as the "complete" mark.

A checkpoint is the folder OUTPUT/checkpoints/step_00001234/ holding what accelerate saves (weights as
safetensors, optimizer and RNG states loaded with torch.load(weights_only=True)) and trainer_state.json:
the step, the run's fingerprint and its history so far. Nothing in it executes code when loaded. Because
batches and noise are a function of (seed, step, rank) (sgan/batches.py), restoring the step restores the
data position too, mid-epoch included.

The run folder's lock is here too (lock_folder, lock_holder): one process trains in a folder at a time.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch

from .config import split_seed
from .data import absolute_spec

try:
    import fcntl  # the run folder's lock; not on Windows, where runs take no lock
except ImportError:
    fcntl = None

STATE_FILE = "trainer_state.json"
LOCK_FILE = ".sgan-lock"  # held by the process training in a folder (fcntl.flock; released when it exits)


def read_json_object(file: Path) -> dict:
    """A JSON object sgan wrote (trainer_state.json, metrics.json, labeled_indices.json). OSError when it
    cannot be read, ValueError when it is not JSON or not an object: callers decide what a bad file means."""
    values = json.loads(file.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"a JSON {type(values).__name__}, not the object sgan writes")
    return values


def lock_folder(output_dir: Path):
    """An open OUTPUT_DIR/.sgan-lock that this process holds an exclusive lock on, or a ValueError naming the
    process that holds it: two runs in one folder (the same command in a second terminal, two studies of one
    folder) would write over each other's checkpoints. Where fcntl is missing (Windows), no lock."""
    if fcntl is None:
        return contextlib.nullcontext()
    handle = open(output_dir / LOCK_FILE, "a+")
    holder = take_lock(handle)
    if holder:
        handle.close()
        raise ValueError(f"--output-dir {output_dir}: {holder} is training there now: wait for it to finish, "
                         "stop it (it checkpoints; then continue with --resume latest), or choose another "
                         "--output-dir")
    handle.truncate(0)
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def lock_holder(output_dir: Path) -> str | None:
    """Who holds OUTPUT_DIR's lock ("process N on HOST"), or None when no process trains there now."""
    if fcntl is None:
        return None
    try:
        handle = open(output_dir / LOCK_FILE)
    except OSError:
        return None  # no lock file: no run has trained there since locks came in
    with handle:  # closing the file releases the lock if take_lock took it
        return take_lock(handle)


def take_lock(handle) -> str | None:
    """Lock the open lock file without waiting: None once this process holds it, else who does."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        handle.seek(0)
        return handle.read().strip() or "another process"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or from a different run; the message says which and what to do."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file cannot be read (damaged, truncated, or not what it should be)."""


# Flags compared by what they resolved to, not as typed: --image-size and --channels by the image shape (a
# folder's default size and --image-size 32 are one size), --num-labels by the labeled images, --label-seed by
# the seed that chose them (split_seed: --label-seed, else --seed).
RESOLVED_FLAGS = ("image_size", "channels", "num_labels", "label_seed")
IMAGE_FLAGS = ("image_size", "channels")  # as typed still, against checkpoints that recorded no image shape


def fingerprint(config, world_size: int, labeled_indices, image_shape) -> dict:
    """What a checkpoint must share with the run that resumes it: the config fields marked resume="match"
    (sgan/config.py), the process count, the labeled subset, the seed that chose it and the image shape."""
    values = {key: getattr(config, key) for key in config.fields_to_match_on_resume()}
    values["world_size"] = world_size
    values["labeled_sha256"] = hashlib.sha256(json.dumps([int(i) for i in labeled_indices]).encode()).hexdigest()
    values["split_seed"] = config.split_seed()
    values["image_shape"] = [int(n) for n in image_shape]
    return values


def with_resolved(theirs: dict, state: dict) -> dict:
    """A checkpoint's fingerprint with the resolved values older checkpoints lack: the image shape (recorded
    beside the fingerprint since 29fa67a) and the split seed (--label-seed if recorded, else --seed)."""
    resolved = {"image_shape": state.get("image_shape"),
                "split_seed": split_seed(theirs.get("seed"), theirs.get("label_seed"))}
    return {**resolved, **theirs}


def is_image_shape(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and \
        all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)


def differences(theirs: dict, ours: dict) -> list[str]:
    """How a checkpoint's fingerprint differs from this run's, said so a user knows which flag to change."""
    shape_known = theirs.get("image_shape") is not None
    found = []
    for key, value in ours.items():
        if theirs.get(key) == value or (key in RESOLVED_FLAGS and (shape_known or key not in IMAGE_FLAGS)):
            continue
        if key == "image_shape":
            if not shape_known:  # checkpoints before 29fa67a: --image-size and --channels as typed instead
                continue
            channels, size = theirs[key][0], theirs[key][-1]
            found.append(f"the images are {'x'.join(map(str, value))} (C x H x W), the checkpoint's were "
                         f"{'x'.join(map(str, theirs[key]))}: resume with --channels {channels} --image-size {size}")
        elif key == "split_seed":
            found.append(f"the labeled and validation images were chosen with seed {theirs[key]!r}, this run's with "
                         f"{value!r}: resume with --label-seed {theirs[key]!r}")
        elif key == "labeled_sha256":
            found.append("the labeled images differ from the checkpoint's (the labeled folder, --num-labels, "
                         "--seed or --label-seed changed)")
        else:
            found.append(f"{key}: checkpoint {theirs.get(key)!r}, this run {value!r}")
    return found


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints (those with a trainer state), oldest first."""
    root = checkpoints_root(output_dir)
    found = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def save(accelerator, output_dir: Path, step: int, run_fingerprint: dict, extra: dict, keep: int,
         tensors: dict | None = None) -> Path:
    """Save a checkpoint at `step` (all processes call this) and keep only the newest `keep`.

    `tensors` ({name: state dict}) are saved as NAME.safetensors beside accelerate's files (e.g. D's EMA)."""
    from safetensors.torch import save_file

    path = checkpoints_root(output_dir) / f"step_{step:08d}"
    accelerator.save_state(str(path), safe_serialization=True)
    if accelerator.is_main_process:
        for name, state in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / f"{name}.safetensors"))
        state = {"step": step, "fingerprint": run_fingerprint, **extra}
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path / STATE_FILE)  # the checkpoint counts only once this file exists
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def find(resume: str, output_dir: Path) -> list[Path]:
    """--resume latest|PATH -> the checkpoint folders to try, newest first (latest: every complete one, so that
    a damaged newest checkpoint falls back to the one before)."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume latest: no complete checkpoint under {checkpoints_root(output_dir)}; "
                                  "start without --resume, or pass a checkpoint folder")
        return found[::-1]
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        return [path]
    if not path.exists():
        why = "no such folder"
    elif complete_checkpoints(path):
        why = (f"a run's folder, not one of its checkpoints: --resume {complete_checkpoints(path)[-1]} (its newest),"
               f" or --resume latest with --output-dir {resume}")
    else:
        why = f"not a complete checkpoint folder (no {STATE_FILE} in it)"
    raise CheckpointError(f"--resume {resume}: {why}; --resume takes `latest` (the newest checkpoint in "
                          "--output-dir) or a folder OUTPUT_DIR/checkpoints/step_*")


def comparable(settings: dict) -> dict:
    """Recorded settings as a run records them now: folder:PATH and npz:FILE absolute (runs before
    data.absolute_spec recorded them as typed, relative to the directory they ran in)."""
    dataset = settings.get("dataset")
    return {**settings, "dataset": absolute_spec(dataset)} if isinstance(dataset, str) else settings


def read_state(path: Path, expected_fingerprint: dict, defaults: dict | None = None) -> dict:
    """The trainer state of a checkpoint, after checking it belongs to this run's configuration.

    A setting missing from an older checkpoint's fingerprint counts as its default in `defaults`: settings are
    added with a default that keeps what runs did before them."""
    try:
        state = read_json_object(path / STATE_FILE)
        step, theirs = int(state["step"]), dict(state["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        why = f"no {error} in it" if isinstance(error, KeyError) else error  # KeyError's text is the bare key
        raise CorruptCheckpoint(f"{path / STATE_FILE}: corrupt trainer state ({why}); resume from another "
                                "checkpoint or start again") from error
    theirs = comparable(with_resolved({**(defaults or {}), **theirs}, state))
    if theirs["image_shape"] is not None and not is_image_shape(theirs["image_shape"]):
        raise CorruptCheckpoint(f"{path / STATE_FILE}: corrupt trainer state (its image_shape "
                                f"{theirs['image_shape']!r} is not [channels, height, width]); resume from another "
                                "checkpoint or start again")
    found = differences(theirs, expected_fingerprint)
    if found:
        raise CheckpointError(f"{path} was written by a different run configuration ({'; '.join(found)}): "
                              "resume with the same flags, or use another --output-dir")
    if step < 0:
        raise CorruptCheckpoint(f"{path / STATE_FILE}: invalid step {step}")
    history, wall = state.get("history", []), state.get("wall_seconds", 0.0)
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history) or \
            not isinstance(wall, (int, float)) or isinstance(wall, bool):  # they failed only after steps had run
        raise CorruptCheckpoint(f"{path / STATE_FILE}: corrupt trainer state (its history or wall_seconds is not "
                                "what sgan writes); resume from another checkpoint or start again")
    state["step"] = step
    return state


def check_random_states(path: Path) -> None:
    """accelerate loads the RNG states last and only logs a failure; read them first, the way it does
    (torch.load with weights_only), so that a damaged or foreign file is an error, never silently skipped."""
    from accelerate.utils import load as accelerate_load

    for file in sorted(path.glob("random_states_*.pkl")):
        try:
            states = accelerate_load(file)
            ok = isinstance(states, dict) and isinstance(states.get("torch_manual_seed"), torch.Tensor)
        except Exception as error:  # torch.load raises many types for damaged or hostile pickles
            ok, detail = False, f"{type(error).__name__}: {error}"
        else:
            detail = "not the random states accelerate writes"
        if not ok:
            raise CorruptCheckpoint(f"{file}: cannot read it ({detail}); resume from another checkpoint or start "
                                    "again")


def load(accelerator, path: Path) -> None:
    """Restore models, optimizers and RNG states; a damaged file is a CheckpointError naming the folder."""
    check_random_states(path)
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # safetensors, torch.load(weights_only) and size mismatches all raise differently
        raise CorruptCheckpoint(f"{path}: cannot load the checkpoint ({type(error).__name__}: {error}); it is corrupt "
                              "or from another model: resume from another checkpoint or start again") from error


def load_tensors(path: Path, name: str) -> dict:
    """A state dict saved by save(tensors=...), read with safetensors (no code runs)."""
    from safetensors.torch import load_file

    file = path / f"{name}.safetensors"
    try:
        return load_file(str(file))
    except Exception as error:  # missing or damaged file
        raise CorruptCheckpoint(f"{file}: cannot read ({type(error).__name__}: {error}); resume from another "
                              "checkpoint or start again") from error
