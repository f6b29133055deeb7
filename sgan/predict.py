"""Classify image files with a trained run: one CSV row per image.

    python -m sgan.predict runs/mnist-100 photos/ extra.png --output preds.csv
    python -m sgan.predict runs/mnist-100/checkpoints/step_00000500 photos/ --output preds.csv --top-k 3

RUN is a run's output dir or a checkpoint folder; each PATH an image file or a folder, searched recursively for
PNG, JPEG, BMP, WebP and GIF files (hidden ones skipped). Images are decoded, fitted and scaled as the run's
training images were (sgan.images.load_image). The CSV has the columns path, class, probability and, with
--top-k K, class_2, probability_2 ... class_K, probability_K (the next classes, most probable first).
Files that cannot be read are not fatal: they are listed with their error in OUTPUT.errors.csv (path, error)
and in the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .evaluate import BAD_INPUT, EvaluationError, add_inference_arguments, parse_inference_args, run_tool_parser
from .images import EXTENSIONS, load_images


def find_images(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files, [(path, error)]): files as given, folders searched recursively in sorted order for image
    files, each path once however many of the given paths reach it (a folder and its subfolder: one row per
    image, not two); a path that does not exist is an error entry, not fatal."""
    files, missing = [], []
    for path in paths:
        if os.path.isdir(path):
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
                files += [os.path.join(folder, name) for name in sorted(names)
                          if not name.startswith(".") and os.path.splitext(name)[1].lower() in EXTENSIONS]
        elif os.path.exists(path):
            files.append(path)  # named on the command line: tried whatever its extension
        else:
            missing.append((path, "no such file or folder"))
    unique = {}
    for file in files:  # the first spelling of each path, in order (a symlink to a listed image keeps its row)
        unique.setdefault(os.path.normpath(os.path.abspath(file)), file)
    return list(unique.values()), missing


def errors_file(output: Path) -> Path:
    """preds.csv -> preds.errors.csv, beside it."""
    return output.with_name(f"{output.stem}.errors.csv")


def predict_files(classifier, files: list[str], output: Path, top_k: int = 1, batch_size: int = 256,
                  progress: bool = True, workers: int | None = None) -> tuple[Counter, list[tuple[str, str]]]:
    """Write the CSV of `files`' predictions to `output`; (images per predicted class, [(path, error)] of the
    files that could not be read). workers: processes decoding the files (default: the cores this process may use)."""
    from tqdm.auto import tqdm

    channels, size, _ = classifier.image_shape
    header = ["path", "class", "probability"] + [f"{name}_{rank}" for rank in range(2, top_k + 1)
                                                 for name in ("class", "probability")]
    errors, predicted = [], Counter()
    Path(output).parent.mkdir(parents=True, exist_ok=True)  # as sgan.export does
    with open(output, "w", newline="", encoding="utf-8") as out, \
            tqdm(total=len(files), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        writer = csv.writer(out)
        writer.writerow(header)
        with contextlib.closing(load_images(files, size, channels, workers)) as images:  # closing: the pool ends here
            decoded = zip(files, images)
            while batch := list(itertools.islice(decoded, batch_size)):
                predicted += _classify(classifier, batch, top_k, writer, errors)
                bar.update(len(batch))
    return predicted, errors


def _classify(classifier, batch, top_k: int, writer, errors: list) -> Counter:
    """One batch of (path, (pixels, error)): the readable ones' CSV rows; the others' errors."""
    readable, pixels, predicted = [], [], Counter()
    for path, (image, error) in batch:
        if error:
            errors.append((path, error))
        else:
            readable.append(path)
            pixels.append(image)
    if readable:
        probabilities, classes = classifier.predict_proba(torch.from_numpy(np.stack(pixels))).topk(top_k, dim=1)
        for path, p, k in zip(readable, probabilities.tolist(), classes.tolist()):
            writer.writerow([path] + [value for rank in range(top_k)
                                      for value in (classifier.class_names[k[rank]], f"{p[rank]:.6f}")])
            predicted[classifier.class_names[k[0]]] += 1
    return predicted


def build_parser() -> argparse.ArgumentParser:
    parser = run_tool_parser("python -m sgan.predict", __doc__)
    parser.add_argument("paths", metavar="PATH", nargs="+", help="image files, or folders searched recursively")
    parser.add_argument("--output", required=True, help="the CSV file to write, e.g. preds.csv (unreadable "
                        "files are listed in preds.errors.csv beside it)")
    parser.add_argument("--top-k", type=int, default=1, help="also write the next K-1 most probable classes and "
                        "their probabilities (default: 1)")
    parser.add_argument("--workers", type=int, default=None, help="processes decoding the images (default: the "
                        "cores this process may use; 1 decodes in this process)")
    add_inference_arguments(parser, batch_size=256)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .classifier import load_classifier

    parser = build_parser()
    args = parse_inference_args(parser, argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    output = Path(args.output)
    if output.is_dir():
        parser.error(f"--output {output} is a folder: give the CSV file to write, e.g. {output / 'predictions.csv'}")
    try:
        classifier = load_classifier(args.run, args.device)
        if args.top_k > len(classifier.class_names):
            raise EvaluationError(f"--top-k {args.top_k}: the run has {len(classifier.class_names)} classes; use at "
                                  f"most {len(classifier.class_names)}")
        files, errors = find_images(args.paths)
        if not files:
            raise EvaluationError(f"no image files in {', '.join(args.paths)} (PNG, JPEG, BMP, WebP, GIF; folders "
                                  "are searched recursively)")
        predicted, unreadable = predict_files(classifier, files, output, args.top_k, args.batch_size,
                                              workers=args.workers)
    except BAD_INPUT as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {output} holds the rows written so far", file=sys.stderr)
        return 130
    errors += unreadable
    side = errors_file(output)
    if errors:
        with open(side, "w", newline="", encoding="utf-8") as out:
            csv.writer(out).writerows([("path", "error"), *errors])
    elif side.exists():
        side.unlink()  # from an earlier run into the same output: it would list files that are fine now
    print(f"{predicted.total()} images classified by {classifier.source} into {output}")
    if predicted:
        print("predicted: " + ", ".join(f"{name} {predicted[name]}" for name in classifier.class_names
                                        if predicted[name]))
    if errors:
        print(f"{len(errors)} could not be read, listed in {side}:")
        for path, error in errors[:5]:
            print(f"  {path}: {error}")
        if len(errors) > 5:
            print(f"  ... and {len(errors) - 5} more")
    return 0 if predicted else 1  # nothing classified: a script should notice


if __name__ == "__main__":
    sys.exit(main())
