"""Evaluate a trained discriminator on the test set: accuracy, per-class accuracy and the confusion matrix.

    python -m sgan.evaluate runs/mnist-100                              # a finished run's --output-dir
    python -m sgan.evaluate runs/mnist-100/checkpoints/step_00000500    # one of its checkpoints
    python -m sgan.evaluate runs/mnist-100 --dataset folder:new-digits  # any labeled source with its classes

Nothing loaded executes code: the configuration is read with yaml.safe_load, the weights from safetensors.
The weights' own record of what they were trained on (a run's weights file carries it in its metadata, a
checkpoint in trainer_state.json) must agree with config.yaml, and a --dataset must have the same classes.
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

from .checkpoints import RESOLVED_FLAGS, STATE_FILE, comparable, read_json_object
from .config import TrainConfig, load_yaml_config
from .data import (DATASETS, DEFAULT_IMAGE_SIZE, DataError, as_tensor, is_builtin, open_source, own_images_path,
                   to_model_scale)
from .images import ImageError, Split
from .losses import class_logits
from .models import build_discriminator, build_generator

RUN_WEIGHTS = ("model/discriminator.safetensors", "model/generator.safetensors")
# accelerate's save_state names the prepared models in order: train.py prepares D first, then G.
CHECKPOINT_WEIGHTS = ("model.safetensors", "model_1.safetensors")
CHECKPOINT_EMA = "ema.safetensors"  # D's moving average: the classifier of a run with --ema-decay
SPLITS = ("test", "val", "labeled")  # what --split scores


class EvaluationError(RuntimeError):
    """A path, config or weights file that cannot be evaluated; the message names the file and the fix."""


# What the command-line tools report as "error: ..." and exit 1 on: bad input, never a traceback.
BAD_INPUT = (EvaluationError, DataError, ImageError, ValueError, OSError)


@dataclasses.dataclass
class Source:
    """What to evaluate: the run's config.yaml and the weights files (generator: None when there is none)."""
    path: Path
    kind: str  # "run" or "checkpoint"
    config_file: Path
    discriminator_file: Path  # the classifier: D, or D's moving average when the run keeps one
    generator_file: Path | None


@dataclasses.dataclass
class Record:
    """What the weights themselves say they were trained on (not config.yaml, which a user can edit)."""
    file: Path  # where it was read: the weights file's metadata, or a checkpoint's trainer_state.json
    dataset: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (channels, height, width) the classifier takes
    settings: dict  # the training settings recorded with the weights


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
    if kind == "checkpoint" and (path / CHECKPOINT_EMA).is_file():  # what training scored, and model/ holds
        d_file = path / CHECKPOINT_EMA
    if not d_file.is_file():
        hint = f"evaluate one of its checkpoints (checkpoints/step_*), or finish the run (--config {config_file} " \
            "--resume latest)" if kind == "run" else "the checkpoint is incomplete: evaluate another one"
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


def unreadable_weights(file: Path, error: Exception) -> EvaluationError:
    return EvaluationError(f"{file}: cannot read the weights ({type(error).__name__}: {error}); the file is "
                           "corrupt or not safetensors: evaluate another checkpoint, or retrain")


def recorded(file: Path) -> dict:
    """What a run's JSON file records, or {} when it is missing or unreadable: the weights loaded fine, so a
    missing note is no failure."""
    try:
        return read_json_object(file)
    except (OSError, ValueError):
        return {}


def number(value):
    """A number a run's JSON file records, or None for anything else (an edited file is no crash)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_json(file: Path, what: str) -> dict:
    """A run's JSON file, which sgan writes as an object; anything else is a damaged file."""
    try:
        return read_json_object(file)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{file}: cannot read {what} ({error}); the run's files are incomplete or damaged: "
                              "evaluate another checkpoint, or the finished run") from error


def checked_record(file: Path, dataset, class_names, image_shape, settings) -> Record:
    """A Record of what `file` says, each part of the type sgan writes: an edited record is an error, never
    classes named by numbers or a crash further on."""
    problem = None
    if not isinstance(dataset, str):
        problem = f"dataset {dataset!r} is not a dataset name"
    elif not isinstance(class_names, list) or len(class_names) < 2 or len(set(map(str, class_names))) < \
            len(class_names) or not all(isinstance(name, str) for name in class_names):
        problem = f"class_names {class_names!r} are not two or more different names"
    elif not isinstance(image_shape, list) or len(image_shape) != 3 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in image_shape):
        problem = f"image_shape {image_shape!r} is not (channels, height, width)"
    elif not isinstance(settings, dict):
        problem = f"the settings {settings!r} are not a mapping"
    if problem:
        raise EvaluationError(f"{file}: its record of the training is damaged ({problem}): evaluate another "
                              "checkpoint of the run, or retrain")
    return Record(file, dataset, tuple(class_names), tuple(image_shape), settings)


def shape_from_settings(dataset: str, image_size: int | None, channels: int | None):
    """The image shape training used, when the settings alone tell it (None: they do not)."""
    if is_builtin(dataset):
        return DATASETS[dataset].image_shape
    if dataset.startswith("folder:"):
        image_size = image_size or DEFAULT_IMAGE_SIZE
    return (channels, image_size, image_size) if channels and image_size else None


def read_record(source: Source, config: TrainConfig) -> Record:
    """The weights' own record: a run's weights file metadata, or a checkpoint's trainer_state.json (its
    fingerprint, class names and image shape; checkpoints before 29fa67a take the class names from the run's
    labeled_indices.json). Weights from before sgan recorded anything fall back to config.yaml (they are all of
    built-in datasets)."""
    if source.kind == "checkpoint":
        state_file = source.path / STATE_FILE
        if not state_file.is_file():
            raise EvaluationError(f"{state_file}: missing, so the checkpoint is incomplete (it is written last); "
                                  "evaluate another checkpoint")
        state = read_json(state_file, "the trainer state")
        settings = state.get("fingerprint") or {}
        dataset = settings.get("dataset", config.dataset) if isinstance(settings, dict) else None
        run_dir = source.config_file.parent
        class_names, shape = state.get("class_names"), state.get("image_shape")
        if class_names is None:  # checkpoints before 29fa67a: the run's labeled_indices.json has them
            class_names = read_json(run_dir / "labeled_indices.json", "the run's class names").get("class_names")
        if shape is None and isinstance(settings, dict) and isinstance(dataset, str):
            shape = shape_from_settings(dataset, settings.get("image_size"), settings.get("channels"))
        if shape is None and (run_dir / "metrics.json").is_file():  # the whole run has one shape
            shape = read_json(run_dir / "metrics.json", "the run's metrics").get("image_shape")
        if shape is None:
            raise EvaluationError(f"{source.path}: its run chose the channels from the images (--channels auto) "
                                  "and has not finished, so nothing records the image shape; evaluate the finished "
                                  "run, or rerun with --channels 1 or 3")
        return checked_record(state_file, dataset, class_names, list(shape) if isinstance(shape, tuple) else shape,
                              settings)
    from safetensors import safe_open

    try:
        with safe_open(str(source.discriminator_file), framework="pt") as weights:
            about = weights.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise unreadable_weights(source.discriminator_file, error) from error
    if "sgan_config" not in about:
        if not is_builtin(config.dataset):
            raise EvaluationError(f"{source.discriminator_file}: records nothing of its training; sgan writes "
                                  "what a run was trained on into its weights: retrain the run")
        info = DATASETS[config.dataset]
        return Record(source.config_file, config.dataset, info.class_names, info.image_shape, {})
    try:
        return checked_record(source.discriminator_file, about["dataset"], json.loads(about["class_names"]),
                              json.loads(about["image_shape"]), json.loads(about["sgan_config"]))
    except (KeyError, ValueError) as error:
        raise EvaluationError(f"{source.discriminator_file}: its record of the training ({error}) is damaged: "
                              "evaluate a checkpoint of the run, or retrain") from error


def check_record(record: Record, config: TrainConfig, config_file: Path) -> None:
    """config.yaml must say what the weights say: an edited or swapped config.yaml would rebuild another
    network, or score the weights on another dataset."""
    ours = comparable({key: getattr(config, key) for key in config.fields_to_match_on_resume()})
    theirs = comparable(record.settings)
    differences = [f"{key}: config.yaml {getattr(config, key)!r}, the weights {record.settings[key]!r}"
                   for key in ours if key in theirs and theirs[key] != ours[key]
                   and key not in RESOLVED_FLAGS]  # a resumed run may spell these otherwise (the shape is checked)
    if differences:
        raise EvaluationError(f"{config_file} does not describe the weights it sits with ({'; '.join(differences)}; "
                              f"the weights' own record: {record.file}): restore the config.yaml the run wrote")


def open_run(path: Path) -> tuple[Source, TrainConfig, Record]:
    """A run or checkpoint folder -> its files, its config and the weights' record, checked against each other."""
    source = locate(Path(path))
    config = read_config(source.config_file)
    record = read_record(source, config)
    check_record(record, config, source.config_file)
    return source, config, record


def load_weights(module: torch.nn.Module, file: Path, config_file: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise unreadable_weights(file, error) from error
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


def build_models(source: Source, config: TrainConfig, record: Record, device: torch.device,
                 with_generator: bool = True):
    """D (and G when its weights exist and with_generator) as configured by the run, weights loaded, in eval
    mode on `device`."""
    spec = config.network_spec(record.image_shape, len(record.class_names))
    discriminator = build_discriminator(spec)
    load_weights(discriminator, source.discriminator_file, source.config_file)
    if not with_generator or source.generator_file is None:
        generator = None
    else:
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
    lines = [f"{result.get('split', 'test')} accuracy {result['test_accuracy']:.4f} (error "
             f"{100 * result['test_error']:.2f}%) on {result['num_images']} images of {result['scored_on']}", "",
             f"{'class':>5}  {'name':<{width}}  {'images':>6}  {'accuracy':>8}"]
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
        torch.zeros(1, device=device).cpu()  # fails now, with a message, if the device is not usable here
    except Exception as error:  # RuntimeError, AssertionError; NotImplementedError (meta: no data), ImportError (hpu)
        why = str(error).split(". ")[0] or type(error).__name__  # torch's first sentence, not its list of backends
        raise EvaluationError(f"--device {name}: not usable here ({why}); use --device cpu") from error
    return device


def check_scorable(name: str, class_names, image_shape, record: Record) -> None:
    """A source can score the run only with the run's classes, in its order, and images of its shape."""
    run = f"the run (trained on {record.dataset}, recorded in {record.file})"
    if tuple(image_shape) != tuple(record.image_shape):
        raise EvaluationError(f"{name}'s images are {'x'.join(map(str, image_shape))}, but {run} takes "
                              f"{'x'.join(map(str, record.image_shape))} (C x H x W): score it on images of that "
                              "shape (a folder or npz is fitted to it)")
    if tuple(class_names) != tuple(record.class_names):
        raise EvaluationError(f"{name} has the classes {', '.join(class_names)}, but {run} has "
                              f"{', '.join(record.class_names)}: score it on a source with the same classes, in the "
                              "same order")


def open_scored_images(config: TrainConfig, record: Record, dataset: str | None, data_root: str | None, split: str,
                       run_dir: Path | None = None):
    """(the source, its split to score): the run's own source as training opened it, or --dataset SOURCE fitted
    to the run's image shape; its classes must be the run's. The val split of a run that held out --val-size
    images is those images (labeled_indices.json in run_dir records them)."""
    root = data_root or config.data_root
    if dataset is None:
        own = own_images_path(record.dataset)
        if own is not None and not Path(own[1]).exists():
            raise EvaluationError(f"the run trained on {record.dataset}, which is not there any more: if the images "
                                  f"moved, pass --dataset {own[0]}:NEW_PATH")
        images = open_source(record.dataset, root, config.image_size, config.channels, config.skip_bad_images)
    elif is_builtin(dataset):
        info = DATASETS[dataset]
        check_scorable(dataset, info.class_names, info.image_shape, record)  # before reading (or fetching) it
        images = open_source(dataset, root)
    else:
        channels, size, _ = record.image_shape
        images = open_source(dataset, root, size, channels, config.skip_bad_images)
    check_scorable(images.name, images.class_names, images.image_shape, record)
    scored = getattr(images, split)
    if scored is None and split == "val" and dataset is None and run_dir is not None:
        held_out = read_json(run_dir / "labeled_indices.json", "the run's labeled and validation images") \
            .get("validation_indices") or []
        if held_out:  # --val-size: images of the labeled pool, as training held them out
            index = np.asarray(held_out)
            if index.dtype.kind not in "iu" or index.ndim != 1 or index.min() < 0 or index.max() >= len(images.labeled):
                raise EvaluationError(f"{run_dir / 'labeled_indices.json'}: its validation_indices are not indices "
                                      f"of {images.name}'s {len(images.labeled)} labeled images: restore the file "
                                      "the run wrote")
            scored = Split(images.labeled.images[index], np.asarray(images.labeled.labels)[index], None)
    if scored is None:
        raise EvaluationError(f"{images.name} has no {split} images to score the run on (a folder's {split}/<class>/, "
                              f"an npz's x_{split} and y_{split}, or a run's --val-size); --split chooses another of "
                              f"{', '.join(SPLITS)}")
    return images, scored


def evaluate(path: Path, out: Path | None = None, data_root: str | None = None, batch_size: int = 1000,
             device: str = "auto", dataset: str | None = None, split: str = "test") -> dict:
    """Evaluate the run or checkpoint at `path` on the `split` of its own source, or of `dataset` (a source
    with the same classes); write evaluation.json and the plots into `out`; the result."""
    from .train import save_sample_grid

    source, config, record = open_run(Path(path))
    torch_device = pick_device(device)
    images, scored = open_scored_images(config, record, dataset, data_root, split, source.config_file.parent)
    class_names = record.class_names
    discriminator, generator = build_models(source, config, record, torch_device)
    matrix = confusion_matrix(discriminator, as_tensor(scored.images),
                              torch.from_numpy(np.asarray(scored.labels)), config.formulation, len(class_names),
                              batch_size, torch_device)
    num_labels = number(recorded(source.config_file.parent / "labeled_indices.json").get("num_labels")) \
        or config.num_labels
    result = {"source": str(source.path), "kind": source.kind, "config": str(source.config_file),
              "weights": str(source.discriminator_file), "dataset": config.dataset, "recipe": config.recipe,
              "formulation": config.formulation, "num_labels": num_labels,  # the count, where the flag says auto
              "seed": config.seed, "scored_on": images.name, "split": split, **summarize(matrix, class_names)}
    # the step of the weights (a run's evaluation.json is not mistaken for a later one's after --resume)
    if source.kind == "checkpoint":
        result["step"] = number(recorded(source.path / STATE_FILE).get("step"))
    else:
        metrics = recorded(source.path / "metrics.json")
        result["step"] = number(metrics.get("steps"))
        if dataset is None and split == "test":  # what training reported for the same weights and images
            result["reported_test_accuracy"] = number(metrics.get("test_accuracy"))

    out = Path(out) if out is not None else source.path
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion_matrix(result, out / "confusion_matrix.png",
                          f"{config.dataset}, {config.recipe}/{config.formulation}, {result['num_labels']} labels\n"
                          f"{split} accuracy {100 * result['test_accuracy']:.2f}%"
                          f"{'' if dataset is None else ' on ' + images.name}")
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
    parser.add_argument("path", metavar="PATH", help=RUN_HELP)
    parser.add_argument("--dataset", metavar="SOURCE", default=None,
                        help="score the run on another labeled source with the same classes (a built-in dataset, "
                        "folder:PATH or npz:FILE; images fitted to the run's size and channels); default: the run's "
                        "own")
    parser.add_argument("--split", default="test", choices=SPLITS,
                        help="which images of the source to score: test (default), val, or labeled (a built-in "
                        "dataset's training split)")
    parser.add_argument("--data-root", default=None,
                        help="dataset root (default: the run's --data-root, else $SGAN_DATA_ROOT or ./data)")
    parser.add_argument("--out", default=None, help="where to write evaluation.json and the PNGs (default: PATH)")
    add_inference_arguments(parser, batch_size=1000)
    parser.add_argument("--cpu", action="store_true", help="same as --device cpu")
    return parser


RUN_HELP = "a run's output dir, or a checkpoint folder OUTPUT_DIR/checkpoints/step_*"


def run_tool_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a tool whose first argument is a run (predict, export)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN", help=RUN_HELP)
    return parser


def add_inference_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """--batch-size and --device, as the tools that run a classifier (evaluate, predict) take them."""
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"images per forward (default: {batch_size})")
    parser.add_argument("--device", default="auto", help="torch device: auto (the GPU when one is visible), cpu, "
                        "cuda or e.g. cuda:1 (default: auto)")


def parse_inference_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_inference_args(parser, argv)
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file: give a folder to write evaluation.json and the PNGs into")
    try:
        device = "cpu" if args.cpu else args.device
        result = evaluate(Path(args.path), args.out, args.data_root, args.batch_size, device, args.dataset,
                          args.split)
    except BAD_INPUT as error:
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
