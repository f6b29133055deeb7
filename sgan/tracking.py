"""Experiment trackers through accelerate: W&B (offline without an API key), TensorBoard, or none.

A tracker that fails to start, or to log, is a warning: training never stops for it."""
from __future__ import annotations

import os
import warnings
from pathlib import Path


def wandb_offline_if_no_key(accelerator) -> None:
    """W&B runs offline when there is no API key (said once), so training never waits for a login."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"
    accelerator.print("wandb: no API key found (WANDB_API_KEY or `wandb login`): logging offline under the output dir")


def start_tracker(accelerator, config, output_dir: Path) -> bool:
    """Start the chosen tracker; a tracker that fails to start is a warning, never the end of training."""
    if config.tracker == "none":
        return False
    init_kwargs = {}
    if config.tracker == "wandb":
        wandb_offline_if_no_key(accelerator)
        init_kwargs = {"wandb": {"dir": str(output_dir), "name": output_dir.name}}
    try:
        accelerator.init_trackers("sgan", config=config.to_dict(), init_kwargs=init_kwargs)
        return True
    except Exception as error:  # any tracker failure: keep training, say so
        warnings.warn(f"tracker {config.tracker!r} failed to start ({error}); training goes on without it")
        return False


def wandb_images(paths: dict) -> dict:
    """{name: wandb.Image} for image files; empty (with a warning) if wandb cannot make them."""
    try:
        import wandb

        return {name: wandb.Image(str(path)) for name, path in paths.items()}
    except Exception as error:
        warnings.warn(f"could not prepare images for wandb: {error}")
        return {}
