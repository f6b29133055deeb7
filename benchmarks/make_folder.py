"""Write a built-in dataset out as a folder of image files, the way a practitioner's own data looks:

    PATH/labeled/<class>/*.png|jpg   a few labeled images per class, unbalanced (--labeled-min .. --labeled-max)
    PATH/unlabeled/<a>/<b>/*.png|jpg the unlabeled images, nested, without labels
    PATH/val/<class>/*.png           validation images (labeled)
    PATH/test/<class>/*.png          test images (labeled; from the dataset's test split)

    python benchmarks/make_folder.py runs/mnist-folder --dataset mnist --unlabeled 20000

The training split is shuffled (--seed) and cut into labeled, unlabeled and validation images, disjoint;
half of the labeled and unlabeled files are JPEG (quality 95), the rest PNG. Class folders use the class
names ("/" becomes "-"). Then train on it with `--dataset folder:PATH --image-size 32`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def write_image(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    if path.suffix == ".jpg":
        image.save(path, quality=95)
    else:
        image.save(path)


def make_folder(out: Path, dataset: str, unlabeled: int, val_per_class: int, test: int, labeled_min: int,
                labeled_max: int, seed: int, root: str | None) -> dict:
    from sgan.data import dataset_info, read_builtin_split

    info = dataset_info(dataset)
    names = [name.replace("/", "-") for name in info.class_names]
    train_x, train_y = (t.numpy() for t in read_builtin_split(dataset, True, root))
    test_x, test_y = (t.numpy() for t in read_builtin_split(dataset, False, root))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_y))
    labeled_counts = rng.integers(labeled_min, labeled_max + 1, size=len(names))  # unbalanced on purpose
    taken, counts = [], {}
    for c, name in enumerate(names):
        rows = order[train_y[order] == c][: labeled_counts[c] + val_per_class].tolist()
        for k, i in enumerate(rows[: labeled_counts[c]]):
            write_image(train_x[i], out / "labeled" / name / f"{i}.{'jpg' if k % 2 else 'png'}")
        for i in rows[labeled_counts[c]:]:
            write_image(train_x[i], out / "val" / name / f"{i}.png")
        taken += rows
        counts[name] = int(labeled_counts[c])
    taken = set(taken)
    rest = [i for i in order if i not in taken][:unlabeled]
    for k, i in enumerate(rest):
        write_image(train_x[i], out / "unlabeled" / f"{k % 7}" / f"{k % 3}" / f"{i}.{'jpg' if k % 2 else 'png'}")
    for i in rng.permutation(len(test_y))[:test]:
        write_image(test_x[i], out / "test" / names[test_y[i]] / f"{i}.png")
    summary = {"dataset": dataset, "labeled_per_class": counts, "labeled": int(sum(counts.values())),
               "unlabeled": len(rest), "val": val_per_class * len(names), "test": min(test, len(test_y)), "seed": seed}
    (out / "made_by.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder to write (must not exist yet)")
    parser.add_argument("--dataset", default="mnist", help="a built-in dataset (default: mnist)")
    parser.add_argument("--unlabeled", type=int, default=20000, help="unlabeled images (default: 20000)")
    parser.add_argument("--val-per-class", type=int, default=100, help="validation images per class (default: 100)")
    parser.add_argument("--test", type=int, default=10000, help="test images (default: 10000, the whole test split)")
    parser.add_argument("--labeled-min", type=int, default=3, help="fewest labeled images of a class (default: 3)")
    parser.add_argument("--labeled-max", type=int, default=15, help="most labeled images of a class (default: 15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists: choose a new folder")
    if not 1 <= args.labeled_min <= args.labeled_max:
        parser.error("need 1 <= --labeled-min <= --labeled-max")
    summary = make_folder(args.out, args.dataset, args.unlabeled, args.val_per_class, args.test, args.labeled_min,
                          args.labeled_max, args.seed, args.data_root)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
