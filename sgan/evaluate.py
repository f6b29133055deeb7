"""Evaluate a trained discriminator on the test set: accuracy, per-class accuracy and the confusion matrix.

    python -m sgan.evaluate runs/mnist-100                              # a finished run's --output-dir
    python -m sgan.evaluate runs/mnist-100/checkpoints/step_00000500    # one of its checkpoints

Nothing loaded executes code: the configuration is read with yaml.safe_load, the weights from safetensors.
Writes evaluation.json, confusion_matrix.png and (when there is a generator) evaluation_samples.png into
--out (default: PATH itself, so evaluating a checkpoint never overwrites the run's own evaluation).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoints import STATE_FILE
from .config import TrainConfig, load_yaml_config
from .data import DataError, open_source, to_model_scale
from .images import ImageError
from .losses import class_logits
from .models import build_discriminator, build_generator

RUN_WEIGHTS = ("model/discriminator.safetensors", "model/generator.safetensors")
# accelerate's save_state names the prepared models in order: train.py prepares D first, then G.
CHECKPOINT_WEIGHTS = ("model.safetensors", "model_1.safetensors")


class EvaluationError(RuntimeError):
    """A path, config or weights file that cannot be evaluated; the message names the file and the fix."""


@dataclasses.dataclass
class Source:
    """What to evaluate: the run's config.yaml and the weights files (generator: None when there is none)."""
    path: Path
    kind: str  # "run" or "checkpoint"
    config_file: Path
    discriminator_file: Path
    generator_file: Path | None


def locate(path: Path) -> Source:
    """A run's output dir or one of its checkpoint folders -> the files to load."""
    if not path.is_dir():
        raise EvaluationError(f"{path}: no such directory; pass a run's --output-dir or a checkpoint folder "
                              "(OUTPUT_DIR/checkpoints/step_*)")
    if (path / CHECKPOINT_WEIGHTS[0]).is_file() or (path / STATE_FILE).is_file():
        run_dir, (d_name, g_name) = path.resolve().parent.parent, CHECKPOINT_WEIGHTS  # OUTPUT_DIR/checkpoints/step_*
        kind = "checkpoint"
    elif (path / "config.yaml").is_file():
        run_dir, (d_name, g_name) = path, RUN_WEIGHTS
        kind = "run"
    else:
        raise EvaluationError(f"{path}: neither a run directory (no config.yaml) nor a checkpoint folder (no "
                              f"{CHECKPOINT_WEIGHTS[0]}); pass a run's --output-dir or OUTPUT_DIR/checkpoints/step_*")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise EvaluationError(f"{config_file}: missing; a checkpoint is read with the config.yaml of its run, two "
                              "levels up: keep the checkpoint inside its run's checkpoints/ folder")
    d_file = path / d_name
    if not d_file.is_file():
        hint = "evaluate one of its checkpoints (checkpoints/step_*), or finish the run (--resume latest)" \
            if kind == "run" else "the checkpoint is incomplete: evaluate another one"
        raise EvaluationError(f"{d_file}: missing, so there is no discriminator to evaluate; {hint}")
    g_file = path / g_name
    return Source(path, kind, config_file, d_file, g_file if g_file.is_file() else None)


def read_config(file: Path) -> TrainConfig:
    """config.yaml -> a validated TrainConfig (sgan.config's own reader: safe_load, unknown keys refused)."""
    try:
        config = TrainConfig(**load_yaml_config(str(file)))
        config.validate()
    except (ValueError, TypeError) as error:
        message = str(error).removeprefix(f"--config {file}: ")
        raise EvaluationError(f"{file}: {message}. It must be the config.yaml the run wrote: "
                              "fix or restore it") from error
    return config


def load_weights(module: torch.nn.Module, file: Path, config_file: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise EvaluationError(f"{file}: cannot read the weights ({type(error).__name__}: {error}); the file is "
                              "corrupt or not safetensors: evaluate another checkpoint, or retrain") from error
    # accelerate saves checkpoints with get_state_dict(unwrap=False): a DDP-wrapped model's keys may start
    # with "module." (depending on the accelerate/torch versions), which the plain model does not expect.
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # missing/unexpected keys or shape mismatches
        first_lines = "; ".join(line.strip().rstrip(".:") for line in str(error).strip().splitlines()[1:3])
        raise EvaluationError(f"{file}: the weights do not match the architecture in {config_file} ({first_lines}); "
                              "evaluate the weights with the config.yaml of the run that wrote them") from error


def build_models(source: Source, config: TrainConfig, image_shape, num_classes: int, device: torch.device):
    """D (and G when its weights exist) as configured by the run, weights loaded, in eval mode on `device`."""
    spec = config.network_spec(image_shape, num_classes)
    discriminator = build_discriminator(spec)
    load_weights(discriminator, source.discriminator_file, source.config_file)
    generator = None
    if source.generator_file is not None:
        generator = build_generator(spec)
        load_weights(generator, source.generator_file, source.config_file)
        generator.to(device).eval()
    return discriminator.to(device).eval(), generator


@torch.no_grad()
def confusion_matrix(discriminator, images, labels, formulation: str, num_classes: int, batch_size: int,
                     device: torch.device) -> torch.Tensor:
    """[K, K] counts, rows = true class, columns = predicted class (argmax of D's class logits)."""
    from tqdm.auto import tqdm

    counts = torch.zeros(num_classes * num_classes, dtype=torch.long)
    # delay: the bar shows up only when the evaluation takes more than a moment (large sets, slow devices)
    for start in tqdm(range(0, len(images), batch_size), desc="evaluate", delay=2.0, dynamic_ncols=True):
        x = to_model_scale(images[start:start + batch_size].to(device))
        y = labels[start:start + batch_size]
        predicted = class_logits(discriminator(x), formulation).argmax(dim=1).cpu()
        counts += torch.bincount(y * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def summarize(matrix: torch.Tensor, class_names) -> dict:
    """Accuracy and per-class accuracy from a confusion matrix."""
    total, correct = int(matrix.sum()), int(matrix.trace())
    per_class = []
    for k, name in enumerate(class_names):
        count, hits = int(matrix[k].sum()), int(matrix[k, k])
        per_class.append({"class": k, "name": name, "count": count, "correct": hits,
                          "accuracy": hits / count if count else None})
    return {"num_images": total, "test_accuracy": correct / total, "test_error": 1 - correct / total,
            "per_class": per_class, "class_names": list(class_names), "confusion_matrix": matrix.tolist()}


def format_report(result: dict) -> str:
    """The per-class table and the confusion matrix as plain-text tables."""
    names = result["class_names"]
    width = max(len(name) for name in names)
    lines = [f"test accuracy {result['test_accuracy']:.4f} (error {100 * result['test_error']:.2f}%) on "
             f"{result['num_images']} images", "", f"{'class':>5}  {'name':<{width}}  {'images':>6}  {'accuracy':>8}"]
    for row in result["per_class"]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{row['class']:>5}  {row['name']:<{width}}  {row['count']:>6}  {accuracy:>8}")
    matrix = result["confusion_matrix"]
    cell = max(5, len(str(max(max(row) for row in matrix))) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              f"{'':>{width + 4}}" + "".join(f"{k:>{cell}}" for k in range(len(names)))]
    for k, row in enumerate(matrix):
        lines.append(f"{k:>2}  {names[k]:<{width}}" + "".join(f"{n:>{cell}}" for n in row))
    return "\n".join(lines)


def plot_confusion_matrix(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    matrix, names = result["confusion_matrix"], result["class_names"]
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * k, 0.75 + 0.7 * k))
    image = ax.imshow(matrix, cmap="Blues")
    high = max(max(row) for row in matrix)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i][j] > high / 2 else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # fails now, with a message, if the device is not usable here
    except (RuntimeError, AssertionError) as error:
        raise EvaluationError(f"--device {name}: not usable here ({error}); use --device cpu") from error
    return device


def evaluate(path: Path, out: Path | None = None, data_root: str | None = None, batch_size: int = 1000,
             device: str = "auto") -> dict:
    """Evaluate the run or checkpoint at `path`, write evaluation.json and the plots into `out`; the result."""
    from .train import save_sample_grid

    source = locate(Path(path))
    config = read_config(source.config_file)
    torch_device = pick_device(device)
    images = open_source(config.dataset, data_root or config.data_root, config.image_size, config.channels,
                         config.skip_bad_images)
    if images.test is None:
        raise EvaluationError(f"{images.name} has no test images to score the run on (a folder's test/<class>/, "
                              "an npz's x_test and y_test)")
    class_names = images.class_names
    discriminator, generator = build_models(source, config, images.image_shape, len(class_names), torch_device)
    matrix = confusion_matrix(discriminator, torch.from_numpy(np.asarray(images.test.images)),
                              torch.from_numpy(np.asarray(images.test.labels)), config.formulation, len(class_names),
                              batch_size, torch_device)
    result = {"source": str(source.path), "kind": source.kind, "config": str(source.config_file),
              "weights": str(source.discriminator_file), "dataset": config.dataset, "recipe": config.recipe,
              "formulation": config.formulation, "num_labels": config.num_labels, "seed": config.seed,
              **summarize(matrix, class_names)}
    if source.kind == "checkpoint":
        try:
            result["step"] = json.loads((source.path / STATE_FILE).read_text())["step"]
        except (OSError, ValueError, KeyError):
            result["step"] = None  # the weights loaded fine: a missing step is not worth failing for
    elif (source.path / "metrics.json").is_file():  # what training reported for the same weights, to compare
        try:
            result["reported_test_accuracy"] = json.loads((source.path / "metrics.json").read_text())["test_accuracy"]
        except (OSError, ValueError, KeyError):
            pass

    out = Path(out) if out is not None else source.path
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(result, out / "confusion_matrix.png",
                          f"{config.dataset}, {config.recipe}/{config.formulation}, {config.num_labels} labels\n"
                          f"test accuracy {100 * result['test_accuracy']:.2f}%")
    result["files"] = {"confusion_matrix": str(out / "confusion_matrix.png")}
    if generator is not None:
        save_sample_grid(generator, out / "evaluation_samples.png", torch_device, config.seed)
        result["files"]["samples"] = str(out / "evaluation_samples.png")
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    result["files"]["evaluation"] = str(out / "evaluation.json")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sgan.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="PATH",
                        help="a run's output dir, or a checkpoint folder OUTPUT_DIR/checkpoints/step_*")
    parser.add_argument("--data-root", default=None,
                        help="dataset root (default: the run's --data-root, else $SGAN_DATA_ROOT or ./data)")
    parser.add_argument("--out", default=None, help="where to write evaluation.json and the PNGs (default: PATH)")
    parser.add_argument("--batch-size", type=int, default=1000, help="test images per forward (default: 1000)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda:1 (default: auto, the GPU "
                        "when one is visible)")
    parser.add_argument("--cpu", action="store_true", help="same as --device cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    try:
        device = "cpu" if args.cpu else args.device
        result = evaluate(Path(args.path), args.out, args.data_root, args.batch_size, device)
    except (EvaluationError, DataError, ImageError, ValueError, OSError) as error:  # bad input: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{result['source']} ({result['kind']}{', step ' + str(result['step']) if result.get('step') else ''}: "
          f"{result['dataset']}, {result['recipe']}, {result['formulation']}, {result['num_labels']} labels, "
          f"seed {result['seed']})")
    print(format_report(result))
    if result.get("reported_test_accuracy") is not None:
        print(f"(metrics.json reports test accuracy {result['reported_test_accuracy']:.4f})")
    print("\nwrote " + ", ".join(result["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
