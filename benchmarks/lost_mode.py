"""A lost mode, as a picture: a run's labeled images of class TRUE and of class CALLED, then test images of
TRUE it gets right, and those it calls CALLED. For built-in datasets (the run's own labeled_indices.json).

    python benchmarks/lost_mode.py RUN TRUE CALLED OUT.png [--data-root data]

e.g. `python benchmarks/lost_mode.py runs/paper/salimans/runs/mnist/salimans/labels-100/seed-103 7 2 sevens.png`
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import sgan
from sgan.data import read_builtin_split

PER_ROW, SCALE, LABEL_WIDTH = 20, 3, 170


def row(images: torch.Tensor, side: int) -> np.ndarray:
    """Up to PER_ROW grey images [N, 1, H, W] side by side, each in a 1-pixel grey frame; white where none."""
    tiles = [np.pad(image[0].numpy(), 1, constant_values=128) for image in images[:PER_ROW]]
    tiles += [np.full((side, side), 255, np.uint8)] * (PER_ROW - len(tiles))
    return np.concatenate(tiles, axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("true", help="the class whose images are lost (its name)")
    parser.add_argument("called", help="the class they are called instead")
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args(argv)

    record = json.loads((args.run / "labeled_indices.json").read_text())
    names = record["class_names"]
    true, called = names.index(args.true), names.index(args.called)
    x_train, y_train = read_builtin_split(record["dataset"], train=True, root=args.data_root)
    x_test, y_test = read_builtin_split(record["dataset"], train=False, root=args.data_root)
    if x_train.shape[1] != 1:
        raise SystemExit("error: lost_mode.py draws grey images only")
    labeled = torch.tensor(record["indices"])
    classifier = sgan.load_classifier(args.run)
    predicted = torch.tensor([names.index(c) for c in classifier.predict(x_test)])
    lost = x_test[(y_test == true) & (predicted == called)]
    print(f"test {args.true}s called {args.called}: {len(lost)} of {int((y_test == true).sum())}")

    side = x_train.shape[-1] + 2
    rows = [(f"labeled {args.true}s", row(x_train[labeled][y_train[labeled] == true], side)),
            (f"labeled {args.called}s", row(x_train[labeled][y_train[labeled] == called], side)),
            (f"test {args.true}s called {args.true}", row(x_test[(y_test == true) & (predicted == true)], side)),
            (f"test {args.true}s called {args.called}", row(lost, side)),
            ("(more)", row(lost[PER_ROW:], side))]
    canvas = Image.new("L", (LABEL_WIDTH + PER_ROW * side * SCALE, len(rows) * side * SCALE), 255)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=18)
    for i, (name, pixels) in enumerate(rows):
        tile = Image.fromarray(pixels).resize((pixels.shape[1] * SCALE, side * SCALE), Image.NEAREST)
        canvas.paste(tile, (LABEL_WIDTH, i * side * SCALE))
        draw.text((8, i * side * SCALE + 35), name, fill=0, font=font)
    canvas.save(args.out)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
