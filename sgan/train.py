"""The training loop: a semi-supervised GAN whose discriminator is the classifier, read top to bottom.

Each step of the seed recipe:
  1. D step: three separate D forwards (labeled, unlabeled, generated batches: BatchNorm normalises each
     batch by its own statistics), one loss call over the concatenated logits with per-row targets
     (class / UNLABELED / GENERATED), loss = CE / n_labeled + w * (real / n_real + fake / n_generated).
  2. G step: non-saturating loss -log D(G(z)).
The supervised recipe runs the same D on the labeled batches only: the baseline every claim is measured against.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from . import batches, ops
from .batches import StepBatches
from .config import TrainConfig, parse_config
from .data import DataError, dataset_info, load_split, parse_num_labels, select_labeled_indices
from .losses import GENERATED, UNLABELED, class_logits
from .models import Discriminator, Generator


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


@torch.no_grad()
def evaluate(accelerator, discriminator, images, labels, config: TrainConfig) -> float:
    """Test accuracy of D's class logits; each process scores its shard, so every image counts exactly once."""
    discriminator.eval()
    mine = torch.tensor(batches.shard(len(images), accelerator.process_index, accelerator.num_processes))
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    for chunk in mine.split(config.eval_batch_size):
        x, y = images[chunk].to(accelerator.device), labels[chunk].to(accelerator.device)
        correct += (class_logits(discriminator(x), config.formulation).argmax(dim=1) == y).sum()
    discriminator.train()
    return int(accelerator.reduce(correct, reduction="sum")) / len(images)


def save_sample_grid(generator, path: Path, latent_dim: int, device, seed: int, rows: int = 10) -> None:
    from torchvision.utils import save_image

    z = torch.randn(rows * rows, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        images = generator(z)
    generator.train(was_training)
    save_image(images, path, nrow=rows, normalize=True, value_range=(-1, 1))


def wandb_offline_if_no_key(accelerator) -> None:
    """W&B runs offline when there is no API key (said once), so training never waits for a login."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"
    accelerator.print("wandb: no API key found (WANDB_API_KEY or `wandb login`): logging offline under the output dir")


def start_tracker(accelerator, config: TrainConfig, output_dir: Path) -> bool:
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


def train(config: TrainConfig) -> dict:
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    config.validate()
    output_dir = Path(config.output_dir)
    tracker = config.tracker if config.tracker != "none" else None
    accelerator = Accelerator(cpu=config.cpu, log_with=tracker, project_dir=str(output_dir))
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    info = dataset_info(config.dataset)
    semi_supervised = config.recipe == "seed"

    # ---- data: the labeled subset, the unlabeled stream (the whole training set) and the test set, in memory
    with accelerator.main_process_first():
        train_images, train_labels = load_split(config.dataset, train=True, root=config.data_root)
        test_images, test_labels = load_split(config.dataset, train=False, root=config.data_root)
    num_labels = parse_num_labels(config.num_labels)
    labeled = select_labeled_indices(train_labels, num_labels, info.num_classes, config.seed)
    labeled_images_all, labeled_labels_all = train_images[labeled].to(device), train_labels[labeled].to(device)
    train_images = train_images.to(device)
    labeled_batch = min(config.batch_size, len(labeled))
    labeled_batches = StepBatches(len(labeled), labeled_batch, config.seed, "labeled", rank, world_size)
    unlabeled_batches = StepBatches(len(train_images), config.batch_size, config.seed, "unlabeled", rank, world_size)
    steps_per_epoch = batches.steps_per_epoch(len(train_images), config.batch_size, world_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)

    # ---- models and optimisers (identical initial weights on every process)
    torch.manual_seed(config.seed)
    discriminator = Discriminator(info.num_classes, config.formulation, width=config.d_width, dropout=config.dropout)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
    if semi_supervised:
        generator = Generator(config.latent_dim, width=config.g_width)
        opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
        discriminator, generator, opt_d, opt_g = accelerator.prepare(discriminator, generator, opt_d, opt_g)
    else:
        generator = opt_g = None
        discriminator, opt_d = accelerator.prepare(discriminator, opt_d)
    backend = ops.resolve_backend(config.loss_backend, device)

    def loss_sums(logits, target):
        return ops.discriminator_loss_sums(logits, target, config.formulation, backend=backend)

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

    # ---- the loop
    history = []
    test_accuracy = None
    start = time.perf_counter()
    progress = tqdm(total=total_steps, disable=not accelerator.is_local_main_process, desc="train", dynamic_ncols=True)
    for step in range(total_steps):
        batches.seed_step(config.seed, step, rank)  # noise and dropout: a function of (seed, step, rank)
        picked = labeled_batches.indices(step).to(device)
        labeled_images, labels = labeled_images_all[picked], labeled_labels_all[picked]

        # D step
        logits = [discriminator(labeled_images)]
        targets = [labels]
        if semi_supervised:
            unlabeled_images = train_images[unlabeled_batches.indices(step).to(device)]
            z = torch.randn(config.batch_size, config.latent_dim, device=device)
            fake_images = generator(z).detach()
            logits.append(discriminator(unlabeled_images))
            targets.append(torch.full((len(unlabeled_images),), UNLABELED, device=device))
            with bn_stats_frozen(discriminator, config.freeze_bn_on_fakes):
                logits.append(discriminator(fake_images))
            targets.append(torch.full((len(fake_images),), GENERATED, device=device))
        sums = loss_sums(torch.cat(logits), torch.cat(targets))
        n_labeled = len(labeled_images)
        d_loss = sums[0] / n_labeled
        if semi_supervised:
            d_loss = d_loss + config.unlabeled_weight * (
                sums[1] / (n_labeled + len(unlabeled_images)) + sums[2] / len(fake_images))
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(d_loss)
        opt_d.step()

        # G step: non-saturating -log D(G(z)), D's parameters are not updated here
        g_loss = None
        if semi_supervised:
            z = torch.randn(config.batch_size, config.latent_dim, device=device)
            with bn_stats_frozen(discriminator, config.freeze_bn_on_fakes):
                fake_logits = discriminator(generator(z))
            g_target = torch.full((len(fake_logits),), UNLABELED, device=device)
            g_loss = loss_sums(fake_logits, g_target)[1] / len(fake_logits)
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(g_loss)
            opt_g.step()

        losses = {"d_loss": d_loss.item(), "supervised_ce": sums[0].item() / n_labeled}
        if g_loss is not None:
            losses["g_loss"] = g_loss.item()
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"non-finite loss at step {step + 1}: {losses}; lower --lr or check the data")
        progress.update(1)
        progress.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
        if tracking and (step + 1) % config.log_every == 0:
            accelerator.log(losses, step=step + 1)

        if (step + 1) % steps_per_epoch == 0 or step + 1 == total_steps:
            test_accuracy = evaluate(accelerator, discriminator, test_images, test_labels, config)
            epoch = (step + 1) / steps_per_epoch
            history.append({"epoch": round(epoch, 4), "step": step + 1, "test_accuracy": test_accuracy})
            if accelerator.is_local_main_process:
                progress.write(f"epoch {epoch:.2f}/{epochs}  step {step + 1}  test accuracy {test_accuracy:.4f}")
            if tracking:
                accelerator.log({"test_accuracy": test_accuracy, "epoch": epoch}, step=step + 1)
    progress.close()
    wall_seconds = time.perf_counter() - start
    step = total_steps

    # ---- outputs
    real_per_step = (labeled_batch + (config.batch_size if semi_supervised else 0)) * world_size
    metrics = {
        "test_accuracy": test_accuracy,
        "test_error": 1.0 - test_accuracy,
        "num_labels": len(labeled),
        "dataset": config.dataset,
        "recipe": config.recipe,
        "formulation": config.formulation,
        "seed": config.seed,
        "steps": step,
        "epochs": step / steps_per_epoch,
        "wall_seconds": wall_seconds,
        "images_per_second": real_per_step * step / wall_seconds,
        "loss_backend": backend,
        "world_size": world_size,
        "history": history,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (output_dir / "model").mkdir(exist_ok=True)
        networks = {"discriminator": discriminator, "generator": generator}
        for name, network in networks.items():
            if network is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(network).state_dict().items()}
                save_file(state, str(output_dir / "model" / f"{name}.safetensors"))
        if generator is not None:
            save_sample_grid(accelerator.unwrap_model(generator), output_dir / "samples.png", config.latent_dim,
                             device, config.seed)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if tracking:
        if generator is not None and config.tracker == "wandb" and accelerator.is_main_process:
            log_sample_image(accelerator, output_dir / "samples.png", step)
        accelerator.end_training()
    accelerator.print(f"test accuracy {test_accuracy:.4f} (error {100 * (1 - test_accuracy):.2f}%) after {step} steps, "
                      f"{wall_seconds:.0f} s; outputs in {output_dir}")
    return metrics


def log_sample_image(accelerator, path: Path, step: int) -> None:
    try:
        import wandb

        accelerator.log({"samples": wandb.Image(str(path))}, step=step)
    except Exception as error:
        warnings.warn(f"could not log the sample grid to wandb: {error}")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    try:
        train(config)
    except (ValueError, FloatingPointError, DataError) as error:  # bad input: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
