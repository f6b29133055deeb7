"""Export a run's classifier as a standalone torch.export program, loadable without sgan.

    python -m sgan.export runs/mnist-100 --output mnist-100.pt2

The program takes uint8 images [N, C, H, W] at the run's size and channels (N any batch size; it scales them
to [-1, 1] itself) and returns the K class logits [N, K] (float32); softmax gives the class probabilities.
Files must be decoded and fitted to C x H x W beforehand, as training did (sgan.images.load_image, or the
same rule in your own code: the centred square, scaled bilinearly). The class names and the image shape
travel inside the file, as the extra file "sgan.json" of torch.export.save. To use it, with torch only:

    import json, torch
    extra = {"sgan.json": ""}
    program = torch.export.load("mnist-100.pt2", extra_files=extra)
    about = json.loads(extra["sgan.json"])          # class_names, image_shape, input, output, run
    logits = program.module()(images_uint8)         # [N, K]
    names = [about["class_names"][k] for k in logits.argmax(1)]

ONNX is not written: torch's ONNX exporter needs the onnx and onnxscript packages, which sgan does not
depend on (and which were not available to test an ONNX path with).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .data import to_model_scale
from .evaluate import BAD_INPUT, run_tool_parser

METADATA = "sgan.json"  # the extra file of the .pt2 that names the classes
MAX_BATCH = 1 << 20  # the batch dimension's upper bound (torch.export needs one; any real batch is below it)


class Uint8Classifier(nn.Module):
    """uint8 images [N, C, H, W] -> the K class logits: the scaling of training, then the classifier."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(to_model_scale(images))


def export_program(classifier) -> torch.export.ExportedProgram:
    """The classifier (sgan.classifier.Classifier) as a program of uint8 images with a dynamic batch size."""
    module = Uint8Classifier(classifier).eval().requires_grad_(False)  # inference only: no autograd in the graph
    example = torch.zeros((2, *classifier.image_shape), dtype=torch.uint8, device=classifier.device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def about(classifier) -> dict:
    """What a user of the file needs to know, stored beside the program."""
    return {"class_names": list(classifier.class_names), "image_shape": list(classifier.image_shape),
            "input": "uint8 images [N, C, H, W] at image_shape, pixel values 0..255",
            "output": "float32 class logits [N, K], K = len(class_names); softmax gives the probabilities",
            "run": classifier.source}


def export(run, output, device: str = "cpu") -> dict:
    """Export the classifier of `run` (a run's output dir or a checkpoint folder) to `output` (.pt2), check that
    the saved file reproduces the classifier's logits, and return its metadata."""
    from .classifier import load_classifier

    classifier = load_classifier(run, device)
    program = export_program(classifier)
    metadata = about(classifier)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # opened here: a folder or an unwritable path is then an OSError naming it, as in sgan.predict, not
    # torch's RuntimeError from its own writer
    with open(output, "wb") as file:
        torch.export.save(program, file, extra_files={METADATA: json.dumps(metadata)})

    # the file, read back, must give the classifier's logits (a batch size other than the example's)
    images = torch.randint(0, 256, (3, *classifier.image_shape), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    loaded = torch.export.load(output).module()
    with torch.no_grad():
        expected, got = classifier.logits(images), loaded(images.to(classifier.device)).cpu()
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"{output}: the exported program's logits differ from the classifier's by up to "
                           f"{(expected - got).abs().max():.3g}; please report this")
    return metadata


def build_parser() -> argparse.ArgumentParser:
    parser = run_tool_parser("python -m sgan.export", __doc__)
    parser.add_argument("--output", required=True, help="the file to write, e.g. model.pt2")
    parser.add_argument("--device", default="cpu", help="the device the program runs on (default: cpu; a program "
                        "exported on cuda runs on cuda)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a folder: give the file to write, e.g. "
                     f"{Path(args.output) / 'model.pt2'}")
    try:
        metadata = export(args.run, args.output, args.device)
    except BAD_INPUT as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    channels, height, width = metadata["image_shape"]
    print(f"wrote {args.output}: uint8 [N, {channels}, {height}, {width}] -> logits of "
          f"{len(metadata['class_names'])} classes ({', '.join(metadata['class_names'])})")
    print(f'load it with torch alone: torch.export.load("{args.output}", extra_files={{"{METADATA}": ""}})')
    return 0


if __name__ == "__main__":
    sys.exit(main())
