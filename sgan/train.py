"""The training loop: a semi-supervised GAN whose discriminator is the classifier, read top to bottom.

Each step of the seed recipe:
  1. D step: three separate D forwards (labeled, unlabeled, generated batches: BatchNorm normalises each
     batch by its own statistics), one loss call over the concatenated logits with per-row targets
     (class / UNLABELED / GENERATED), loss = CE / n_labeled + w * (real / n_real + fake / n_generated).
  2. G step: non-saturating loss -log D(G(z)).
The salimans recipe (Salimans et al. 2016) has the same D step with its MLP D, trains G by feature matching
(with its gradient norm clipped) and evaluates an exponential moving average of D's weights.
The supervised recipe runs the same D on the labeled batches only: the baseline every claim is measured against.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from . import batches, checkpoints, ops
from .batches import StepBatches
from .config import TrainConfig, parse_config
from .data import DataError, dataset_info, load_split, parse_num_labels, select_labeled_indices
from .losses import GENERATED, UNLABELED, class_logits
from .models import build_discriminator, build_generator
from .tracking import start_tracker, wandb_images


@contextmanager
def bn_stats_frozen(module: torch.nn.Module, enabled: bool = True):
    """BatchNorm still normalises by the batch's statistics but leaves its running statistics alone.

    Used for generated batches, so that the running statistics used at test time describe real images."""
    saved = []
    if enabled:
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                saved.append((m, m.momentum))
                m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


@contextmanager
def frozen(module: torch.nn.Module):
    """Parameters excluded from autograd for a while (no gradients computed or stored for them)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@torch.no_grad()
def evaluate(accelerator, discriminator, images, labels, config: TrainConfig) -> float:
    """Test accuracy of D's class logits; each process scores its shard, so every image counts exactly once.

    Takes the unwrapped D: a DDP forward would start a collective that processes with smaller shards skip."""
    discriminator.eval()
    mine = torch.tensor(batches.shard(len(images), accelerator.process_index, accelerator.num_processes))
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for chunk in mine.split(config.eval_batch_size):
        x, y = images[chunk].to(accelerator.device), labels[chunk].to(accelerator.device)
        correct += (class_logits(discriminator(x), config.formulation).argmax(dim=1) == y).sum()
    discriminator.train()
    return int(accelerator.reduce(correct, reduction="sum")) / len(images)


def discriminator_loss(loss_sums, logits: list, targets: list, config: TrainConfig):
    """D's loss from its forwards' logits and targets, [labeled] or [labeled, unlabeled, generated]:
    CE / n_labeled + w * (real / n_real + fake / n_generated). Returns it and the loss sums (for logging).

    One loss call over all rows; with --real-rows unlabeled (the paper's code) the labeled rows get a call of
    their own, so that they enter the cross-entropy only."""
    n_labeled = len(targets[0])
    if len(logits) == 1:  # supervised
        sums = loss_sums(logits[0], targets[0])
        return sums[0] / n_labeled, sums
    if config.real_rows == "unlabeled":
        supervised, unsupervised = loss_sums(logits[0], targets[0]), loss_sums(torch.cat(logits[1:]),
                                                                               torch.cat(targets[1:]))
        sums, n_real = torch.cat([supervised[:1], unsupervised[1:]]), len(targets[1])
    else:
        sums, n_real = loss_sums(torch.cat(logits), torch.cat(targets)), n_labeled + len(targets[1])
    return sums[0] / n_labeled + config.unlabeled_weight * (sums[1] / n_real + sums[2] / len(targets[2])), sums


def learning_rate(config: TrainConfig, step: int, schedule_steps: int) -> float:
    """--lr; with --lr-decay linear, held for the first --lr-decay-start of the schedule, then down to 0 at its end."""
    if config.lr_decay == "none":
        return config.lr
    decay_from = config.lr_decay_start * schedule_steps
    return config.lr * min(1.0, (schedule_steps - step) / (schedule_steps - decay_from))


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


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step: checkpoint, then a clean exit."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, accelerator) -> bool:
        """True on every process once any process got a signal (so all of them checkpoint together)."""
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag > 0)


def inject_failure(step: int, rank: int) -> None:
    """Testing hook: SGAN_INJECT_FAILURE=RANK:STEP makes that process fail at that step."""
    spec = os.environ.get("SGAN_INJECT_FAILURE")
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"injected failure on rank {rank} at step {step} (SGAN_INJECT_FAILURE={spec})")


def build_accelerator(config: TrainConfig, output_dir: Path):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one global state per process; reset its training settings (not the process group)
    # so that several runs in one Python process (tests, notebooks) can use different precisions.
    AcceleratorState._reset_state()

    tracker = config.tracker if config.tracker != "none" else None
    return Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision, log_with=tracker,
                       project_dir=str(output_dir),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))])


def train(config: TrainConfig) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    config.validate()
    output_dir = Path(config.output_dir)
    accelerator = build_accelerator(config, output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    info = dataset_info(config.dataset)
    semi_supervised = config.recipe != "supervised"
    feature_matching = config.recipe == "salimans"  # G matches D's mean features; else non-saturating -log D(G(z))
    if config.sync_bn and device.type != "cuda":
        raise ValueError("--sync-bn synchronises BatchNorm across GPUs and needs CUDA; this run is on "
                         f"{device.type}: drop --sync-bn")

    # ---- data: the labeled subset, the unlabeled stream (the whole training set) and the test set, in memory
    with accelerator.main_process_first():
        train_images, train_labels = load_split(config.dataset, train=True, root=config.data_root)
        test_images, test_labels = load_split(config.dataset, train=False, root=config.data_root)
    num_labels = parse_num_labels(config.num_labels)
    labeled = select_labeled_indices(train_labels, num_labels, info.num_classes, config.seed)
    labeled_images_all, labeled_labels_all = train_images[labeled].to(device), train_labels[labeled].to(device)
    train_images = train_images.to(device)
    # Every process gets equal-sized batches, so dividing each process's sums by its own row counts and
    # letting DDP average the gradients equals normalising the global sums by the global counts.
    labeled_batch = min(config.batch_size, len(labeled))
    labeled_batches = StepBatches(len(labeled), labeled_batch, config.seed, "labeled", rank, world_size)
    unlabeled_batches = StepBatches(len(train_images), config.batch_size, config.seed, "unlabeled", rank, world_size)
    # feature matching compares G's features with those of another unlabeled batch (as the paper's code)
    matching_batches = StepBatches(len(train_images), config.batch_size, config.seed, "matching", rank, world_size)
    steps_per_epoch = batches.steps_per_epoch(len(train_images), config.batch_size, world_size)
    total_steps = schedule_steps = config.epochs * steps_per_epoch  # the lr schedule follows --epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- models and optimisers (identical initial weights on every process)
    def adam(network):  # the same optimiser settings for D and G
        return torch.optim.Adam(network.parameters(), lr=config.lr, betas=(config.beta1, 0.999), eps=config.adam_eps)

    torch.manual_seed(config.seed)
    discriminator = build_discriminator(config, info.num_classes)
    opt_d = adam(discriminator)
    generator = opt_g = None
    if semi_supervised:
        generator = build_generator(config)
        opt_g = adam(generator)
    if hasattr(discriminator, "init_from_batch") and not config.resume:
        # data-dependent initialisation (Salimans): on the first global batch, identical on every process
        first = StepBatches(len(train_images), config.batch_size, config.seed, "unlabeled", 0, world_size).indices(0)
        discriminator.to(device).init_from_batch(train_images[first.to(device)])
        if hasattr(generator, "init_from_batch"):  # no G in the supervised recipe
            generator.to(device).init_from_batch(generator.sample_latent(config.batch_size, device))
    if config.sync_bn:
        discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        if generator is not None:
            generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
    if semi_supervised:
        discriminator, generator, opt_d, opt_g = accelerator.prepare(discriminator, generator, opt_d, opt_g)
    else:
        discriminator, opt_d = accelerator.prepare(discriminator, opt_d)
    plain_d = accelerator.unwrap_model(discriminator)  # for the G step and evaluation (see below)
    plain_g = accelerator.unwrap_model(generator) if generator is not None else None
    ema = None
    if config.ema_decay > 0:  # an average of D's weights, the classifier that is evaluated
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(plain_d, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    classifier = ema.module if ema is not None else plain_d
    backend = ops.resolve_backend(config.loss_backend, device)

    def loss_sums(logits, target):
        return ops.discriminator_loss_sums(logits, target, config.formulation, backend=backend)

    # ---- resume
    run_fingerprint = checkpoints.fingerprint(config, world_size, labeled)
    start_step, history, wall_before = 0, [], 0.0
    last_checkpoint = resumed_from = None
    if config.resume:
        last_checkpoint = checkpoints.find(config.resume, output_dir)
        state = checkpoints.read_state(last_checkpoint, run_fingerprint)
        checkpoints.load(accelerator, last_checkpoint)
        start_step, history, wall_before = state["step"], state.get("history", []), state.get("wall_seconds", 0.0)
        if ema is not None:
            ema.module.load_state_dict(checkpoints.load_tensors(last_checkpoint, "ema"))
            ema.n_averaged.fill_(max(start_step, 1))
        if start_step > total_steps:
            raise checkpoints.CheckpointError(f"{last_checkpoint} is at step {start_step}, past this run's "
                                              f"{total_steps} steps: raise --max-steps or --epochs")
        resumed_from = str(last_checkpoint)
        accelerator.print(f"sgan: resumed from {last_checkpoint} at step {start_step}")

    if accelerator.is_main_process:
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        (output_dir / "labeled_indices.json").write_text(json.dumps(
            {"dataset": config.dataset, "seed": config.seed, "num_labels": len(labeled),
             "indices": labeled.tolist()}))
    tracking = start_tracker(accelerator, config, output_dir)
    accelerator.print(
        f"sgan: {config.recipe} recipe, {config.formulation}, {config.dataset} with {len(labeled)} labels, "
        f"{total_steps} steps ({epochs} epoch(s) of {steps_per_epoch}), batch {config.batch_size} x "
        f"{world_size} process(es) on {device}, loss backend {backend}")

    def save_checkpoint(step: int):
        extra = {"history": history, "wall_seconds": wall_before + time.perf_counter() - start}
        tensors = {"ema": ema.module.state_dict()} if ema is not None else None
        return checkpoints.save(accelerator, output_dir, step, run_fingerprint, extra, config.keep_checkpoints, tensors)

    # ---- the loop
    test_accuracy = history[-1]["test_accuracy"] if history else None
    start = time.perf_counter()
    progress = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="train", dynamic_ncols=True)
    with StopRequest() as stop:
        for step in range(start_step, total_steps):
            inject_failure(step, rank)
            batches.seed_step(config.seed, step, rank)  # noise and dropout: a function of (seed, step, rank)
            if config.lr_decay != "none":
                for optimizer in (opt_d, opt_g):
                    for group in optimizer.param_groups if optimizer is not None else ():
                        group["lr"] = learning_rate(config, step, schedule_steps)
            picked = labeled_batches.indices(step).to(device)
            labeled_images, labels = labeled_images_all[picked], labeled_labels_all[picked]

            # D step: three forwards, so BatchNorm normalises each kind of batch by its own statistics
            logits = [discriminator(labeled_images)]
            targets = [labels]
            if semi_supervised:
                unlabeled_images = train_images[unlabeled_batches.indices(step).to(device)]
                z = plain_g.sample_latent(config.batch_size, device)
                fake_images = generator(z).detach()
                logits.append(discriminator(unlabeled_images))
                targets.append(torch.full((len(unlabeled_images),), UNLABELED, device=device))
                with bn_stats_frozen(discriminator, config.freeze_bn_on_fakes):
                    logits.append(discriminator(fake_images))
                targets.append(torch.full((len(fake_images),), GENERATED, device=device))
            d_loss, sums = discriminator_loss(loss_sums, logits, targets, config)
            n_labeled = len(labeled_images)
            opt_d.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            opt_d.step()
            if ema is not None:
                ema.update_parameters(plain_d)

            # G step: non-saturating -log D(G(z)). It runs the *unwrapped* D with its parameters frozen: D is
            # not updated here, so DDP has no D gradients to synchronise (none are computed), and a G loss
            # that leaves some D parameters unused (feature matching) needs no find_unused_parameters.
            g_loss = None
            if semi_supervised:
                z = plain_g.sample_latent(config.batch_size, device)
                with bn_stats_frozen(plain_d, config.freeze_bn_on_fakes), frozen(plain_d), accelerator.autocast():
                    if feature_matching:  # squared gap of the mean last-hidden-layer features
                        real_images = train_images[matching_batches.indices(step).to(device)]
                        gap = plain_d.features(real_images).mean(0) - plain_d.features(generator(z)).mean(0)
                        g_loss = gap.square().mean()
                    else:
                        fake_logits = plain_d(generator(z))
                        g_target = torch.full((len(fake_logits),), UNLABELED, device=device)
                        g_loss = loss_sums(fake_logits, g_target)[1] / len(fake_logits)
                opt_g.zero_grad(set_to_none=True)
                accelerator.backward(g_loss)
                if config.g_clip_norm > 0:
                    accelerator.clip_grad_norm_(generator.parameters(), config.g_clip_norm)
                opt_g.step()

            losses = {"d_loss": d_loss.item(), "supervised_ce": sums[0].item() / n_labeled}
            if g_loss is not None:
                losses["g_loss"] = g_loss.item()
            if not all(math.isfinite(v) for v in losses.values()):
                raise FloatingPointError(
                    f"non-finite loss at step {step + 1}: {losses}; last good checkpoint: "
                    f"{last_checkpoint or 'none saved yet'}. Lower --lr, or check the data")
            progress.update(1)
            progress.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            if tracking and (step + 1) % config.log_every == 0:
                accelerator.log(losses, step=step + 1)

            if (step + 1) % steps_per_epoch == 0 or step + 1 == total_steps:
                test_accuracy = evaluate(accelerator, classifier, test_images, test_labels, config)
                epoch = (step + 1) / steps_per_epoch
                history.append({"epoch": round(epoch, 4), "step": step + 1, "test_accuracy": test_accuracy,
                                "wall_seconds": round(wall_before + time.perf_counter() - start, 2)})
                if accelerator.is_local_main_process:
                    progress.write(f"epoch {epoch:.2f}/{epochs}  step {step + 1}  test accuracy {test_accuracy:.4f}")
                if tracking:
                    log_evaluation(accelerator, config, plain_g, output_dir, step + 1, test_accuracy, epoch)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
                last_checkpoint = save_checkpoint(step + 1)
            if stop.requested(accelerator):
                path = save_checkpoint(step + 1)
                progress.close()
                accelerator.print(f"sgan: stopped by a signal after step {step + 1}; checkpoint {path}. "
                                  f"Continue with --resume latest --output-dir {output_dir}")
                accelerator.end_training()
                return {"interrupted": True, "steps": step + 1, "checkpoint": str(path)}
    progress.close()
    wall_seconds = wall_before + time.perf_counter() - start
    last_checkpoint = save_checkpoint(total_steps)

    # ---- outputs
    real_per_step = (labeled_batch + (config.batch_size if semi_supervised else 0)) * world_size
    metrics = {
        "test_accuracy": test_accuracy,
        "test_error": 1.0 - test_accuracy,
        "num_labels": len(labeled),
        "dataset": config.dataset,
        "recipe": config.recipe,
        "formulation": config.formulation,
        "networks": config.network_family(),
        "seed": config.seed,
        "steps": total_steps,
        "epochs": total_steps / steps_per_epoch,
        "wall_seconds": wall_seconds,
        "images_per_step": real_per_step,  # real images D trains on per step (labeled + unlabeled), all processes
        "images_per_second": real_per_step * (total_steps - start_step) / max(time.perf_counter() - start, 1e-9),
        "loss_backend": backend,
        "world_size": world_size,
        "mixed_precision": config.mixed_precision,
        "resumed_from": resumed_from,
        "history": history,
    }
    if accelerator.is_main_process:
        (output_dir / "model").mkdir(exist_ok=True)
        # discriminator.safetensors holds the classifier that was evaluated (D's EMA when --ema-decay > 0)
        for name, network in {"discriminator": classifier, "generator": plain_g}.items():
            if network is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
                save_file(state, str(output_dir / "model" / f"{name}.safetensors"))
        if plain_g is not None:
            save_sample_grid(plain_g, output_dir / "samples.png", device, config.seed)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if tracking:
        accelerator.end_training()
    accelerator.print(f"test accuracy {test_accuracy:.4f} (error {100 * (1 - test_accuracy):.2f}%) after "
                      f"{total_steps} steps, {wall_seconds:.0f} s; outputs in {output_dir}")
    return metrics


def log_evaluation(accelerator, config, plain_g, output_dir: Path, step: int, accuracy: float, epoch: float):
    """Test accuracy to the tracker, and on W&B the current sample grid too (main process only).

    plain_g is the unwrapped G (or None): sampling needs no DDP wrapper."""
    values = {"test_accuracy": accuracy, "epoch": epoch}
    if plain_g is not None and accelerator.is_main_process:
        path = output_dir / "samples.png"
        save_sample_grid(plain_g, path, accelerator.device, config.seed)
        if config.tracker == "wandb":
            values.update(wandb_images({"samples": path}))
    accelerator.log(values, step=step)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        train(config)
    except (ValueError, FloatingPointError, DataError, checkpoints.CheckpointError) as error:  # bad input: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
