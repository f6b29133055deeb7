"""The training loop: a semi-supervised GAN whose discriminator is the classifier.

`train()` reads top to bottom: data, networks, resume, then per step a D step and a G step (their math is in
sgan/steps.py), with evaluation each epoch, checkpoints, and outputs at the end. The recipes:
  odena       Odena (2016): the conv D is the classifier; G trained by the non-saturating -log D(G(z)).
  salimans    Salimans et al. (2016): MLP D with weight norm and noise; G trained by feature matching (its
              gradient norm clipped); an exponential moving average of D is the classifier.
  supervised  the same D trained on the labeled images only: the baseline every claim is measured against.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from . import batches, checkpoints, ops
from .batches import StepBatches
from .config import LAUNCHED_AS, TrainConfig, parse_config
from .data import (DataError, absolute_spec, as_tensor, is_builtin, open_source, own_images_path, parse_num_labels,
                   split_labeled_pool, to_model_scale)
from .evaluate import recorded
from .images import SPLITS, ImageError, ImageSource
from .losses import class_logits
from .models import build_discriminator, build_generator, check_feature_layer
from .steps import EMA, Networks, StepBatch, StepSettings, d_step, g_step
from .tracking import start_tracker, wandb_images


def train(config: TrainConfig, source: ImageSource | None = None) -> dict:
    """Train one run as configured and return its metrics (also written to OUTPUT_DIR/metrics.json).

    `source` (an sgan.images.ImageSource, e.g. from sgan.images.from_arrays) trains on in-memory images
    instead of --dataset.

    A run stopped by SIGTERM or SIGINT checkpoints, writes no metrics.json, and returns the same dict with
    "interrupted": True, "stopped_by" (the signal's name) and "checkpoint" set; stopped so before its first
    step (while loading data), it raises KeyboardInterrupt (the signal's name as its argument). Raises
    ValueError, DataError, CheckpointError or FloatingPointError (a non-finite loss) with a message that says
    what to fix."""
    # Until stop.arm(), a signal ends the run at once: nothing of it is written yet. `held` keeps the folder's
    # lock (claim_output_dir) until train() returns or raises.
    with StopRequest() as stop, contextlib.ExitStack() as held:
        if source is not None:  # config.yaml records what the run trained on, not --dataset's unused default
            config = replace(config, dataset=source.name)
        config = replace(config, output_dir=os.path.expanduser(config.output_dir),  # --output-dir=~/runs: no shell
                         dataset=absolute_spec(config.dataset))  # the same folder from any directory
        config.validate()
        check_output_outside_images(config)
        output_dir = Path(config.output_dir)
        accelerator = build_accelerator(config, output_dir)
        rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        if config.sync_bn and device.type != "cuda":
            raise ValueError("--sync-bn synchronises BatchNorm across GPUs and needs CUDA; this run is on "
                             f"{device.type}: drop --sync-bn")
        data = load_data(config, accelerator, source)  # before the output dir: bad data leaves no empty folder
        if config.recipe == "salimans":
            check_feature_layer(config.network_spec(data.source.image_shape, len(data.source.class_names)),
                                config.feature_layer)
        check_resume_source(config, accelerator, data)  # a bad --resume PATH must fail before --overwrite deletes
        held.enter_context(claim_output_dir(config, output_dir, accelerator))
        # From here a signal is a request the loop honours after its next step (a checkpoint, then a clean exit):
        # the folder is claimed, and config.yaml, which the continue command reads, must be written whole.
        stop.arm()
        schedule = Schedule.of(config, len(data.unlabeled_rows), world_size)
        warn_about_schedule(config, schedule, accelerator, len(data.unlabeled_rows))
        nets = build_networks(config, data, accelerator)
        settings = step_settings(config, ops.resolve_backend(config.loss_backend, device))
        progress = resume(config, accelerator, nets, data, schedule)
        finished = after_resume(config, accelerator, output_dir, progress, schedule)
        if finished:
            return finished

        if accelerator.is_main_process:
            write_run_record(config, data, output_dir)
        tracking = start_tracker(accelerator, config, output_dir)
        accelerator.print(
            f"sgan: {config.recipe} recipe, {config.formulation}, {config.dataset} with {len(data.labeled_indices)} "
            f"labels, {schedule.total_steps} steps ({schedule.epochs} epoch(s) of {schedule.steps_per_epoch}), batch "
            f"{config.batch_size} x {world_size} process(es) on {device}, loss backend {settings.loss_backend}")

        def save_checkpoint(step: int) -> Path:
            progress.last_checkpoint = checkpoints.save(
                accelerator, output_dir, step, progress.fingerprint,
                {"history": progress.history, "wall_seconds": progress.wall_seconds(),
                 "class_names": list(data.source.class_names), "image_shape": list(data.source.image_shape)},
                config.keep_checkpoints,
                {"ema": nets.ema.module.state_dict()} if nets.ema is not None else None)
            return progress.last_checkpoint

        monitor = LossMonitor()
        progress.started = time.perf_counter()  # the clock of this process's steps (images per second)
        bar = progress_bar(accelerator, schedule.total_steps, progress.start_step)
        for step in range(progress.start_step, schedule.total_steps):
            done = step + 1  # steps finished once this one is
            inject_failure(step, rank)
            batches.seed_step(config.seed, step, rank)  # noise and dropout: a function of (seed, step, rank)
            set_learning_rate(nets, learning_rate(config, step, schedule.schedule_steps))
            batch = data.batch(step)
            losses = d_step(accelerator, nets, batch, settings)
            for _ in range(config.g_steps if nets.generator is not None else 0):
                losses["g_loss"] = g_step(accelerator, nets, batch, settings)  # each on fresh noise z
            monitor.add(done, losses)
            bar.update(1)

            epoch_ends = done % schedule.steps_per_epoch == 0 or done == schedule.total_steps
            checkpoint_due = bool(config.checkpoint_every) and done % config.checkpoint_every == 0 \
                and done < schedule.total_steps
            if done % config.log_every == 0 or epoch_ends or checkpoint_due:  # the only host reads of a step
                values = monitor.read(progress.last_checkpoint)  # raises on a non-finite loss
                bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
                if tracking:
                    accelerator.log(values, step=done)
            if epoch_ends:
                scores = {f"{name}_accuracy": classifier_accuracy(accelerator, nets.classifier, *data.evaluation[name],
                                                                  config.formulation, config.eval_batch_size)
                          if name in data.evaluation else None for name in ("val", "test")}
                epoch = done / schedule.steps_per_epoch
                progress.history.append({"epoch": round(epoch, 4), "step": done, **scores,
                                         "wall_seconds": round(progress.wall_seconds(), 2)})
                if accelerator.is_local_main_process:
                    bar.write(f"epoch {epoch:.2f}/{schedule.epochs}  step {done}  {format_scores(scores)}")
                if tracking:
                    log_evaluation(accelerator, config, nets.plain_g, output_dir, done, scores, epoch)
            if checkpoint_due:
                save_checkpoint(done)
            if done < schedule.total_steps and stop.requested(accelerator, collective=done % config.log_every == 0):
                monitor.read(progress.last_checkpoint)  # never a checkpoint after a non-finite loss
                path = save_checkpoint(done)
                bar.close()
                accelerator.print(f"sgan: stopped by a signal after step {done}; checkpoint {path}. "
                                  + continue_how(output_dir, world_size, source is not None))
                accelerator.end_training()
                return {**run_metrics(config, data, schedule, progress, settings, accelerator, done, interrupted=True),
                        # a rank stopped by another's signal reports SIGTERM
                        "stopped_by": signal.Signals(stop.signal or signal.SIGTERM).name}
        bar.close()
        save_checkpoint(schedule.total_steps)
        metrics = run_metrics(config, data, schedule, progress, settings, accelerator, schedule.total_steps)
        write_outputs(accelerator, config, nets, output_dir, metrics)
        if tracking:
            accelerator.end_training()
        accelerator.print(f"{format_scores(metrics)} after {schedule.total_steps} steps, "
                          f"{metrics['wall_seconds']:.0f} s; outputs in {output_dir}")
        return metrics


# ------------------------------------------------------------------------------------------- the run's parts


def resolve_precision(mixed_precision: str, on_cuda: bool) -> str:
    """--mixed-precision auto: bf16 where bf16 matrix products are native, else "no". Here (AVX512-BF16) a
    bf16 product of D's shapes runs 2.1-2.3x as fast as a float32 one (benchmarks/results/peak.json); where
    bf16 is emulated it would be slower."""
    if mixed_precision == "fp16" and not on_cuda:
        raise ValueError("--mixed-precision fp16 needs a GPU: on the CPU accelerate would train in float32 and "
                         "record fp16; use bf16 or no")
    if mixed_precision != "auto":
        return mixed_precision
    if on_cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "no"


def build_accelerator(config: TrainConfig, output_dir: Path):
    """The Accelerator: this process's device, the process group (DDP) and the tracker."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one global state per process; reset its training settings (not the process group)
    # so that several runs in one Python process (tests, notebooks) can use different precisions.
    AcceleratorState._reset_state()

    tracker = config.tracker if config.tracker != "none" else None
    precision = resolve_precision(config.mixed_precision, on_cuda=torch.cuda.is_available() and not config.cpu)
    return Accelerator(cpu=config.cpu, mixed_precision=precision, log_with=tracker,
                       project_dir=str(output_dir),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))])


@dataclass
class RunData:
    """A run's images and the (seed, step, rank) batches it draws from them. Images stay uint8 and become
    floats in [-1, 1] per batch. They live on the training device, except memory-mapped ones (large datasets
    from the decode cache), which stay on the CPU and are moved a batch at a time."""

    source: ImageSource  # class names, image shape, and the splits as given
    store: torch.device  # where the labeled pool and the unlabeled images live
    labeled_indices: np.ndarray  # into the source's labeled pool
    validation_indices: np.ndarray  # into the labeled pool: held out, never trained on
    labeled_images: torch.Tensor  # uint8, on the training device
    labeled_labels: torch.Tensor
    unlabeled_images: torch.Tensor  # uint8: the source's unlabeled images, else its labeled pool
    unlabeled_rows: torch.Tensor  # the rows of unlabeled_images in the unlabeled stream (not the validation ones)
    evaluation: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "val" and "test" (those there are): CPU uint8, labels
    labeled: StepBatches
    unlabeled: StepBatches | None  # None in the supervised recipe
    matching: StepBatches | None  # feature matching's real batches (salimans)

    def unlabeled_batch(self, positions: torch.Tensor, device) -> torch.Tensor:
        return to_model_scale(self.unlabeled_images[self.unlabeled_rows[positions]].to(device, non_blocking=True))

    def batch(self, step: int) -> StepBatch:
        picked = self.labeled.indices(step)
        device = self.labeled_images.device
        batch = StepBatch(to_model_scale(self.labeled_images[picked]), self.labeled_labels[picked])
        if self.unlabeled is not None:
            batch.unlabeled = self.unlabeled_batch(self.unlabeled.indices(step), device)
        if self.matching is not None:
            batch.matching = self.unlabeled_batch(self.matching.indices(step), device)
        return batch

    def labeled_per_class(self) -> dict[str, int]:
        counts = np.bincount(self.labeled_labels.cpu().numpy(), minlength=len(self.source.class_names))
        return dict(zip(self.source.class_names, counts.tolist()))


def load_data(config: TrainConfig, accelerator, source: ImageSource | None = None) -> RunData:
    """The source's images (--dataset, or `source` given from Python), the validation set and the labeled
    subset chosen by --seed, and the unlabeled stream.

    Every process gets equal-sized batches, so dividing each process's sums by its own row counts and letting
    DDP average the gradients equals normalising the global sums by the global counts."""
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if source is None:
        with accelerator.main_process_first():  # the first process prepares or decodes, the others read
            source = open_source(config.dataset, config.data_root, config.image_size, config.channels,
                                 config.skip_bad_images)
    builtin = source.name == config.dataset and is_builtin(config.dataset)
    if len(source.class_names) < 2:
        raise ValueError(f"{source.name} has one class ({', '.join(source.class_names)}): a classifier needs two or "
                         "more; give each class its own labeled/<class>/ folder (or labels)")
    if config.val_size and source.val is not None:
        raise ValueError(f"--val-size {config.val_size}: {source.name} has its own validation images; drop "
                         "--val-size")
    pool_labels = np.asarray(source.labeled.labels)
    labeled, validation = split_labeled_pool(pool_labels, parse_num_labels(config.num_labels, builtin),
                                             config.val_size, source.class_names, config.split_seed(), builtin)
    large = isinstance(source.labeled.images, np.memmap)
    store = torch.device("cpu") if large else device
    pool = as_tensor(source.labeled.images)
    evaluation = {}
    if len(validation):
        evaluation["val"] = (pool[validation], torch.from_numpy(pool_labels[validation]))
    for name, split in (("val", source.val), ("test", source.test)):
        if split is not None:
            evaluation[name] = (as_tensor(split.images), torch.from_numpy(np.asarray(split.labels)))
    if source.unlabeled is not None:
        unlabeled_images = as_tensor(source.unlabeled.images)
        rows = torch.arange(len(unlabeled_images))
    else:  # the labeled pool is the unlabeled stream too, less the validation images
        unlabeled_images, rows = pool, torch.from_numpy(np.setdiff1d(np.arange(len(pool)), validation))

    def stream(size: int, batch_size: int, name: str) -> StepBatches:
        return StepBatches(size, batch_size, config.seed, name, rank, world_size, store)

    semi_supervised = config.recipe != "supervised"
    return RunData(
        source, store, labeled, validation, pool[labeled].to(device), torch.from_numpy(pool_labels[labeled]).to(device),
        unlabeled_images.to(store), rows.to(store), evaluation,
        labeled=stream(len(labeled), min(config.batch_size, len(labeled)), "labeled"),
        unlabeled=stream(len(rows), config.batch_size, "unlabeled") if semi_supervised else None,
        # feature matching compares G's features with those of another unlabeled batch (as the paper's code)
        matching=stream(len(rows), config.batch_size, "matching") if config.recipe == "salimans" else None)


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int  # this run's steps: --epochs, cut short by --max-steps
    schedule_steps: int  # the steps the lr schedule spans: all of --epochs

    @classmethod
    def of(cls, config: TrainConfig, train_size: int, world_size: int) -> Schedule:
        per_epoch = batches.steps_per_epoch(train_size, config.batch_size, world_size)
        total = config.epochs * per_epoch
        return cls(per_epoch, min(total, config.max_steps or total), total)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def build_networks(config: TrainConfig, data: RunData, accelerator) -> Networks:
    """D, G (not in the supervised recipe), their Adam optimisers and D's moving average, prepared by
    accelerate: identical initial weights on every process, DDP-wrapped when there are several."""
    device = accelerator.device
    spec = config.network_spec(data.source.image_shape, len(data.source.class_names))

    def adam(network):  # the same optimiser settings for D and G; fused: one kernel over all the parameters
        return torch.optim.Adam(network.parameters(), lr=config.lr, betas=(config.beta1, 0.999), eps=config.adam_eps,
                                fused=True)

    torch.manual_seed(config.seed)
    discriminator = build_discriminator(spec)
    generator = build_generator(spec) if config.recipe != "supervised" else None
    opt_d, opt_g = adam(discriminator), adam(generator) if generator is not None else None
    if hasattr(discriminator, "init_from_batch") and not config.resume:
        # data-dependent initialisation (Salimans): on the first global batch, identical on every process
        first = StepBatches(len(data.unlabeled_rows), config.batch_size, config.seed, "unlabeled", 0,
                            accelerator.num_processes, data.store).indices(0)
        discriminator.to(device).init_from_batch(data.unlabeled_batch(first, device))
        if hasattr(generator, "init_from_batch"):
            generator.to(device).init_from_batch(generator.sample_latent(config.batch_size, device))
    if config.sync_bn:
        discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator) if generator is not None else None
    if generator is not None:
        # accelerate: moves each model to the device, wraps it in DDP with several processes, and has the
        # optimisers step the wrapped parameters (one prepare call for all of them)
        discriminator, generator, opt_d, opt_g = accelerator.prepare(discriminator, generator, opt_d, opt_g)
    else:
        discriminator, opt_d = accelerator.prepare(discriminator, opt_d)
    plain_d = accelerator.unwrap_model(discriminator)  # for the G step and evaluation: no DDP collectives
    plain_g = accelerator.unwrap_model(generator) if generator is not None else None
    ema = EMA(plain_d, config.ema_decay) if config.ema_decay > 0 else None
    return Networks(discriminator, plain_d, opt_d, generator, plain_g, opt_g, ema)


def step_settings(config: TrainConfig, loss_backend: str) -> StepSettings:
    return StepSettings(config.formulation, config.unlabeled_weight, config.real_rows,
                        feature_matching=config.recipe == "salimans", freeze_bn_on_fakes=config.freeze_bn_on_fakes,
                        g_clip_norm=config.g_clip_norm, loss_backend=loss_backend,
                        entropy_weight=config.entropy_weight, feature_layer=config.feature_layer)


@dataclass
class Progress:
    """Where the run stands: its first step (0, or the resumed checkpoint's), evaluation history and time."""

    fingerprint: dict  # the settings a checkpoint must share with this run to be resumed by it
    start_step: int = 0
    history: list = field(default_factory=list)
    wall_before: float = 0.0  # seconds spent before this process started (resumed runs)
    started: float = field(default_factory=time.perf_counter)
    last_checkpoint: Path | None = None
    resumed_from: str | None = None

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started


FEW_STEPS = 500  # fewer steps in all is a warning (MNIST's one-epoch quick run is 600; runs learn for thousands)


def warn_about_schedule(config: TrainConfig, schedule: Schedule, accelerator, train_size: int) -> None:
    """Say when the steps are not what the flags suggest: too few to learn (--epochs 1 on a small folder: ~10
    steps), or fewer than --max-steps asked for."""
    if schedule.total_steps < FEW_STEPS and not config.max_steps:
        accelerator.print(
            f"sgan: warning: {schedule.total_steps} steps in all ({schedule.epochs} epoch(s) of "
            f"{schedule.steps_per_epoch}: {train_size} training images in batches of "
            f"{config.batch_size} x {accelerator.num_processes}) is too few to learn much: raise --epochs (--epochs "
            f"{math.ceil(FEW_STEPS / schedule.steps_per_epoch)} trains {FEW_STEPS:,}+ steps)")
    if config.max_steps and config.max_steps > schedule.schedule_steps:
        accelerator.print(f"sgan: --max-steps {config.max_steps} is more than the {schedule.schedule_steps} steps "
                          f"of --epochs {config.epochs}, so the run trains {schedule.schedule_steps}: --max-steps "
                          "only cuts a run short; raise --epochs to train longer")


def check_output_outside_images(config: TrainConfig) -> None:
    """A run's folder inside the image folder's labeled/, unlabeled/, val/ or test/ would add its own pictures
    (samples.png: G's fakes) to those images the next time the folder is read."""
    own = own_images_path(config.dataset)
    if own is None or own[0] != "folder":
        return
    images, output_dir = Path(own[1]).resolve(), Path(config.output_dir).resolve()
    existing = [folder for folder in (output_dir, *output_dir.parents) if folder.exists()]
    for split in SPLITS:
        # samefile: the same folder by any spelling (a symlinked labeled/, a case-insensitive file system)
        if (images / split).is_dir() and any(os.path.samefile(folder, images / split) for folder in existing):
            raise ValueError(f"--output-dir {config.output_dir} is inside {images / split}: the run's own pictures "
                             f"(G's samples) would be read as {split} images the next time; choose an --output-dir "
                             f"outside {images}/{'{'}{','.join(SPLITS)}{'}'}")


def run_fingerprint(config: TrainConfig, accelerator, data: RunData) -> dict:
    return checkpoints.fingerprint(config, accelerator.num_processes, data.labeled_indices, data.source.image_shape)


def check_resume_source(config: TrainConfig, accelerator, data: RunData) -> None:
    """--resume PATH (a checkpoint of this or another run) names a checkpoint this configuration can continue:
    checked before claim_output_dir, whose --overwrite deletes the folder's run. (--resume latest reads the
    folder's own checkpoints, which nothing deletes; resume() checks them, falling back past damaged ones.)"""
    if config.resume in (None, "latest"):
        return
    path = checkpoints.find(config.resume, Path(config.output_dir))[0]
    checkpoints.read_state(path, run_fingerprint(config, accelerator, data), TrainConfig.field_defaults())


def resume(config: TrainConfig, accelerator, nets: Networks, data: RunData, schedule: Schedule) -> Progress:
    """A fresh Progress, or, with --resume, the checkpoint's models, optimisers, RNG states and history.

    With --resume latest, a damaged newest checkpoint falls back to the one before it, with a warning."""
    progress = Progress(run_fingerprint(config, accelerator, data))
    if not config.resume:
        return progress
    candidates = checkpoints.find(config.resume, Path(config.output_dir))
    for i, path in enumerate(candidates):
        try:
            state = checkpoints.read_state(path, progress.fingerprint, TrainConfig.field_defaults())
            checkpoints.load(accelerator, path)  # accelerate: every prepared model and optimiser, and RNG states
            if nets.ema is not None:
                nets.ema.module.load_state_dict(checkpoints.load_tensors(path, "ema"))
            break
        except checkpoints.CorruptCheckpoint as error:
            if i + 1 == len(candidates):
                raise
            warnings.warn(f"{error}\nsgan: falling back to the checkpoint before it, {candidates[i + 1]}")
    if nets.ema is not None:
        nets.ema.started = True
    if state["step"] > schedule.total_steps:
        raise checkpoints.CheckpointError(f"{path} is at step {state['step']}, past this run's "
                                          f"{schedule.total_steps} steps: raise --max-steps or --epochs")
    progress.start_step, progress.history = state["step"], state.get("history", [])
    progress.wall_before, progress.last_checkpoint, progress.resumed_from = state.get("wall_seconds", 0.0), path, str(path)
    accelerator.print(f"sgan: resumed from {path} at step {progress.start_step}")
    return progress


def after_resume(config: TrainConfig, accelerator, output_dir: Path, progress: Progress, schedule: Schedule) -> dict:
    """A branch's replaced run is deleted, now that the other run's checkpoint has loaded (--overwrite, or no
    progress of its own: claim_output_dir refused the rest). Returns the metrics of a run that has finished
    already (nothing to do), else {}."""
    if accelerator.is_main_process and is_branch(config, output_dir):
        delete_run_outputs(output_dir)  # before the replaced run's metrics.json could be read below
    finished = recorded(output_dir / "metrics.json") if progress.start_step == schedule.total_steps else {}
    if finished:  # a damaged metrics.json is written again by the final evaluation
        accelerator.print(f"sgan: the run in {output_dir} has finished its {schedule.total_steps} steps already; "
                          "nothing to do (raise --epochs or --max-steps to train on)")
    return finished


RUN_OUTPUTS = ("checkpoints", "model", "wandb", "sgan", "config.yaml", "labeled_indices.json", "metrics.json",
               "samples.png", "skipped_files.csv")  # what a run writes into --output-dir (sgan/: TensorBoard's folder)
# What sgan.evaluate writes into a run by default: --overwrite deletes them with the run, so nothing of the old
# model is left to describe the new one. Alone (an evaluate --out folder) they are no run, and are left be.
EVALUATION_OUTPUTS = ("evaluation.json", "confusion_matrix.png", "evaluation_samples.png")


def continue_flags(output_dir: Path) -> str:
    """The flags that continue a stopped run: its own settings (config.yaml), its folder (wherever it is now)
    and its newest checkpoint. The bare --resume latest --output-dir fell back to the defaults for the rest."""
    folder = shlex.quote(str(output_dir))
    return f"--config {shlex.quote(str(output_dir / 'config.yaml'))} --output-dir {folder} --resume latest"


def continue_how(output_dir: Path, world_size: int, from_python: bool) -> str:
    """How to continue a stopped run, said after its checkpoint."""
    if from_python:
        return "Continue with train(replace(config, resume='latest'), source), with the same source"
    launch = f" (launched as before, with {world_size} processes)" if world_size > 1 else ""
    return f"Continue with {continue_flags(output_dir)}{launch}"


def write_run_record(config: TrainConfig, data: "RunData", output_dir: Path) -> None:
    """config.yaml (what the continue command reads), labeled_indices.json and skipped_files.csv."""
    # --resume and --overwrite say how this start treated the folder, not what the run is: a file that kept them
    # would make `--config RUN/config.yaml --output-dir NEW` delete NEW's run, or resume where nothing is
    settings = {**config.to_dict(), "resume": None, "overwrite": False}
    (output_dir / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (output_dir / "labeled_indices.json").write_text(json.dumps(
        {"dataset": data.source.name, "seed": config.seed, "label_seed": config.split_seed(),
         "num_labels": len(data.labeled_indices), "class_names": list(data.source.class_names),
         "labeled_per_class": data.labeled_per_class(), "indices": data.labeled_indices.tolist(), "validation_indices": data.validation_indices.tolist()}))
    write_skipped(data.source.skipped, output_dir)


def holds_run(output_dir: Path) -> bool:
    """Whether output_dir holds an sgan run: a file only a run writes (config.yaml and the rest are common names)."""
    return ((output_dir / "labeled_indices.json").is_file() or (output_dir / "metrics.json").is_file()
            or bool(checkpoints.complete_checkpoints(output_dir)))


def claim_output_dir(config: TrainConfig, output_dir: Path, accelerator):
    """--output-dir must be a writable folder (made if missing) that holds no other run, unless the run resumes
    it (--resume) or replaces it (--overwrite deletes the old run's outputs, and nothing else; for a branch from
    another run's checkpoint, train deletes them once that checkpoint has loaded). Files of a
    run's names that no run wrote (a user's model/ or config.yaml, the sgan/ package) are never deleted.
    Returns the folder's lock, held until the caller closes it (on the main process; a no-op elsewhere): no
    second process trains in the folder meanwhile."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder: choose another --output-dir")
    found = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if found and not holds_run(output_dir):
        raise ValueError(f"--output-dir {output_dir} holds {', '.join(found)}, but no sgan run's labeled_indices.json, "
                         "metrics.json or checkpoint, so they may not be a run's: a run would write over them; "
                         "choose a new or empty --output-dir")
    if found and not config.resume and not config.overwrite:
        raise ValueError(f"--output-dir {output_dir} holds a run already ({', '.join(found)}): continue it with "
                         "--resume latest, start it again with --overwrite (deletes its checkpoints and outputs), "
                         "or choose another --output-dir")
    branch = is_branch(config, output_dir)
    progress = checkpoints.complete_checkpoints(output_dir) or (output_dir / "metrics.json").is_file() or \
        (output_dir / "model").is_dir()  # not just the config.yaml of a branch that failed before its checkpoint
    if branch and progress and not config.overwrite:
        raise ValueError(f"--resume {config.resume} is a checkpoint of another run, and --output-dir {output_dir} "
                         "holds a run of its own, which continuing there would overwrite: continue in a new "
                         "--output-dir, or add --overwrite to replace that run")
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one deletes from it
    if not accelerator.is_main_process:
        return contextlib.nullcontext()
    lock = contextlib.ExitStack()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.enter_context(checkpoints.lock_folder(output_dir))
        if found and not config.resume:  # a branch's old run is deleted once its checkpoint has loaded (train)
            delete_run_outputs(output_dir)
        with tempfile.TemporaryFile(dir=output_dir):  # writable? (an existing read-only folder is not)
            pass
    except OSError as error:
        lock.close()
        raise ValueError(f"--output-dir {output_dir}: cannot write there ({error.strerror or error}): choose a "
                         "folder you can write to") from error
    return lock


def is_branch(config: TrainConfig, output_dir: Path) -> bool:
    """--resume names another run's checkpoint (not one under --output-dir/checkpoints)."""
    own_checkpoints = checkpoints.checkpoints_root(output_dir).resolve()
    return config.resume not in (None, "latest") and \
        own_checkpoints not in Path(config.resume).expanduser().resolve().parents


def delete_run_outputs(output_dir: Path) -> None:
    """The files and folders a run (and sgan.evaluate, by default) wrote into output_dir; nothing else, and
    nothing where no run is (an evaluate --out folder keeps its files)."""
    if not any((output_dir / name).exists() for name in RUN_OUTPUTS):
        return
    for name in RUN_OUTPUTS + EVALUATION_OUTPUTS:
        target = output_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def learning_rate(config: TrainConfig, step: int, schedule_steps: int) -> float:
    """--lr; with --lr-decay linear, held for the first --lr-decay-start of the schedule, then down to 0 at its end."""
    if config.lr_decay == "none":
        return config.lr
    decay_from = config.lr_decay_start * schedule_steps
    return config.lr * min(1.0, (schedule_steps - step) / (schedule_steps - decay_from))


def set_learning_rate(nets: Networks, lr: float) -> None:
    for optimizer in (nets.opt_d, nets.opt_g):
        for group in optimizer.param_groups if optimizer is not None else ():
            group["lr"] = lr


class LossMonitor:
    """The latest losses, kept on the device between reads, and the first step whose losses were not finite.

    A step only queues a few tensor ops here; `read` is the one host read, every --log-every steps and before
    each evaluation and checkpoint (so a checkpoint is never written after a non-finite loss)."""

    def __init__(self):
        self.latest: dict[str, torch.Tensor] = {}
        self.first_bad: torch.Tensor | None = None  # the step number, or 0 while every loss was finite

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack(list(losses.values())).float()
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.float64, device=values.device)
        bad = (~torch.isfinite(values).all()) & (self.first_bad == 0)
        self.first_bad = torch.where(bad, float(step), self.first_bad)
        self.latest = losses

    def read(self, last_checkpoint: Path | None) -> dict[str, float]:
        """The latest losses as floats; FloatingPointError if any step since the start had a non-finite loss."""
        *values, first_bad = torch.cat([torch.stack(list(self.latest.values())).double(),
                                        self.first_bad.view(1)]).tolist()
        latest = dict(zip(self.latest, values))
        if first_bad:
            raise FloatingPointError(
                f"non-finite loss at step {int(first_bad)} (latest: {latest}); last good checkpoint: "
                f"{last_checkpoint or 'none saved yet'}. Lower --lr, or check the data")
        return latest


@torch.no_grad()
def classifier_accuracy(accelerator, classifier, images, labels, formulation: str, batch_size: int) -> float:
    """Accuracy of the classifier's class logits; each process scores its shard, so every image counts once.

    Takes an unwrapped network: a DDP forward would start a collective that processes with smaller shards skip."""
    classifier.eval()
    # in float32 under mixed precision too: the classifier that is saved, predicts and is exported. (accelerate
    # wraps a prepared model's forward, and so the EMA's, a copy of it, in autocast; this is the one it wrapped.)
    forward = getattr(classifier, "_original_forward", classifier)
    mine = torch.tensor(batches.shard(len(images), accelerator.process_index, accelerator.num_processes))
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for chunk in mine.split(batch_size):
        x, y = to_model_scale(images[chunk].to(accelerator.device)), labels[chunk].to(accelerator.device)
        correct += (class_logits(forward(x), formulation).argmax(dim=1) == y).sum()
    classifier.train()
    return int(accelerator.reduce(correct, reduction="sum")) / len(images)


def run_metrics(config: TrainConfig, data: RunData, schedule: Schedule, progress: Progress, settings: StepSettings,
                accelerator, steps: int, interrupted: bool = False) -> dict:
    """metrics.json: the final validation and test accuracy (None without that split), what ran, its speed,
    and the per-epoch history."""
    last = progress.history[-1] if progress.history else {}
    accuracy = last.get("test_accuracy")
    labeled_batch = data.labeled.batch_size
    real_per_step = ((labeled_batch + (config.batch_size if data.unlabeled is not None else 0))
                     * accelerator.num_processes)
    seconds_here = max(time.perf_counter() - progress.started, 1e-9)
    return {
        "val_accuracy": last.get("val_accuracy"),
        "test_accuracy": accuracy,
        "test_error": None if accuracy is None else 1.0 - accuracy,
        "num_labels": len(data.labeled_indices),
        "num_val": len(data.evaluation["val"][1]) if "val" in data.evaluation else 0,
        "class_names": list(data.source.class_names),
        "image_shape": list(data.source.image_shape),  # (channels, height, width) the networks take
        "labeled_per_class": data.labeled_per_class(),
        "dataset": data.source.name,  # --dataset, or "arrays" for a source given from Python
        "recipe": config.recipe,
        "formulation": config.formulation,
        "networks": config.network_family(),
        "seed": config.seed,
        "steps": steps,
        "epochs": steps / schedule.steps_per_epoch,
        "wall_seconds": progress.wall_seconds(),
        "images_per_step": real_per_step,  # real images D trains on per step (labeled + unlabeled), all processes
        "images_per_second": real_per_step * (steps - progress.start_step) / seconds_here,
        "loss_backend": settings.loss_backend,
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,  # resolved (auto: bf16 or no)
        "resumed_from": progress.resumed_from,
        "interrupted": interrupted,
        "checkpoint": str(progress.last_checkpoint) if progress.last_checkpoint else None,
        "history": progress.history,
    }


def write_skipped(skipped: list[tuple[str, str]], output_dir: Path) -> None:
    """OUTPUT_DIR/skipped_files.csv: the files of a folder the run left out (bad images under --skip-bad-images,
    files that are no images), each with the reason, and one line saying so: nothing is dropped unseen."""
    listing = output_dir / "skipped_files.csv"
    if not skipped:
        listing.unlink(missing_ok=True)  # from an earlier run into this folder
        return
    with listing.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)
    bad = sum(reason.startswith("bad image") for _, reason in skipped)
    print(f"sgan: left out {len(skipped)} file(s) of the folder ({bad} unreadable image(s)); the list and the "
          f"reasons are in {listing}", flush=True)


def write_outputs(accelerator, config: TrainConfig, nets: Networks, output_dir: Path, metrics: dict) -> None:
    """model/discriminator.safetensors (the evaluated classifier: D's moving average when there is one),
    model/generator.safetensors, samples.png and metrics.json, from the main process.

    Each weights file carries what it was trained on in its metadata (safetensors strings): the run's
    config, the class names and the image shape, so that a classifier file describes itself."""
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        (output_dir / "model").mkdir(exist_ok=True)
        about = {"sgan_config": json.dumps(config.to_dict()), "class_names": json.dumps(metrics["class_names"]),
                 "image_shape": json.dumps(list(metrics["image_shape"])), "dataset": metrics["dataset"]}
        for name, network in {"discriminator": nets.classifier, "generator": nets.plain_g}.items():
            if network is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
                save_file(state, str(output_dir / "model" / f"{name}.safetensors"), metadata=about)
        if nets.plain_g is not None:
            save_sample_grid(nets.plain_g, output_dir / "samples.png", accelerator.device, config.seed)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()


def save_sample_grid(generator, path: Path, device, seed: int, rows: int = 10) -> None:
    """A rows x rows grid of G's samples from fixed noise (the same at every evaluation of a run)."""
    from torchvision.utils import save_image

    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        z = generator.sample_latent(rows * rows, device)
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        images = generator(z)
    generator.train(was_training)
    save_image(images, path, nrow=rows, normalize=True, value_range=(-1, 1))


def format_scores(scores: dict) -> str:
    """"val accuracy 0.9512  test accuracy 0.9498" from {"val_accuracy": ..., "test_accuracy": ...}."""
    shown = [f"{name} accuracy {scores[f'{name}_accuracy']:.4f}" for name in ("val", "test")
             if scores.get(f"{name}_accuracy") is not None]
    return "  ".join(shown) or "no validation or test images to score"


def log_evaluation(accelerator, config, plain_g, output_dir: Path, step: int, scores: dict, epoch: float):
    """Validation and test accuracy to the tracker, and on W&B the current sample grid too (main process only).

    plain_g is the unwrapped G (or None): sampling needs no DDP wrapper."""
    values = {**{k: v for k, v in scores.items() if v is not None}, "epoch": epoch}
    if plain_g is not None and accelerator.is_main_process:
        path = output_dir / "samples.png"
        save_sample_grid(plain_g, path, accelerator.device, config.seed)
        if config.tracker == "wandb":
            values.update(wandb_images({"samples": path}))
    accelerator.log(values, step=step)


def progress_bar(accelerator, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process, desc="train",
                dynamic_ncols=True)


class StopRequest:
    """SIGTERM and SIGINT for the whole run. While it loads and decodes its images, before it claims its output
    folder, a signal raises KeyboardInterrupt at once: nothing of the run is written, and a long decode must not
    make Ctrl-C wait. After arm(), a signal is only a flag the loop checks after each step but the last:
    checkpoint, then a clean exit; in the last step, the run writes its outputs and ends normally."""

    def __init__(self):
        self.signal = None
        self.armed = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def arm(self) -> None:
        self.armed = True

    def _handle(self, signum, frame):
        if not self.armed:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, accelerator, collective: bool) -> bool:
        """True once this process got a signal. With several processes, only on steps where all of them ask
        (`collective`, the same steps on every process), and then on all of them, so that they checkpoint
        together."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        if not collective:
            return False
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)


def inject_failure(step: int, rank: int) -> None:
    """Testing hook: SGAN_INJECT_FAILURE=RANK:STEP makes that process fail at that step."""
    spec = os.environ.get("SGAN_INJECT_FAILURE")
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"injected failure on rank {rank} at step {step} (SGAN_INJECT_FAILURE={spec})")


def main(argv: list[str] | None = None, prog: str = LAUNCHED_AS) -> int:
    config = parse_config(argv, prog)
    try:
        metrics = train(config)
    except KeyboardInterrupt as stopped:  # a signal while the run set up (in the loop, a signal checkpoints instead)
        print("sgan: stopped by a signal before the first step; nothing to save. Run the same command to start "
              "again", file=sys.stderr)
        name = stopped.args[0] if stopped.args and stopped.args[0] in signal.Signals.__members__ else "SIGINT"
        return 128 + signal.Signals[name]
    except (ValueError, FloatingPointError, DataError, ImageError, checkpoints.CheckpointError) as error:  # bad input: a message
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the output dir failed mid-run (disk full, removed, read-only): checkpoints complete
        output_dir = Path(config.output_dir).expanduser()
        how = f"continue with {continue_flags(output_dir)}" if (output_dir / "config.yaml").is_file() else \
            "run the same command again"
        print(f"error: {error}. Checkpoints are written whole or not at all: fix the output dir, then {how}",
              file=sys.stderr)
        return 1
    if metrics.get("interrupted"):  # checkpointed; not 0, so that `train && evaluate` and shell loops stop too
        return 128 + signal.Signals[metrics["stopped_by"]]
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m sgan.train"))
