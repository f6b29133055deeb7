"""sgan.predict on a folder of photos: decoding in one process against a pool of workers, side by side.

    python benchmarks/predict.py [--count 240] [--width 1600] [--height 1200] [--workers 1,2] [--rounds 3]
                                 [--out benchmarks/results/predict.json]

Writes --count colour JPEGs of --width x --height (smooth random pictures, as a camera's photos are large and
compressed) under a temporary folder, then times `predict_files` on them with each --workers value, alternating
in each round, with an odena classifier of 64x64 RGB images (random weights: the timing does not depend on
them). Prints images per second (the median round) and writes JSON. The CSVs of all settings must be
identical, or the benchmark fails.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training import RESULTS, comma_list, machine, write_result  # noqa: E402  (the benchmarks folder is no package)


def make_photos(folder: Path, count: int, width: int, height: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (height // 50, width // 50, 3), dtype=np.uint8)  # smooth once enlarged
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        path = folder / f"photo_{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=240)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument("--workers", type=comma_list, default=["1", "2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "predict.json")
    args = parser.parse_args(argv)

    import torch

    from sgan.classifier import Classifier
    from sgan.models import NetworkSpec, build_discriminator
    from sgan.predict import predict_files

    torch.manual_seed(0)
    shape = (3, 64, 64)
    classifier = Classifier(build_discriminator(NetworkSpec("odena", shape, 10, "k-logit")), "k-logit",
                            [f"class{k}" for k in range(10)], shape)
    rates, csvs = {w: [] for w in args.workers}, {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        files = make_photos(folder, args.count, args.width, args.height)
        print(f"{args.count} JPEGs of {args.width}x{args.height} written in {time.perf_counter() - start:.1f} s "
              f"({sum(Path(f).stat().st_size for f in files) / 2**20:.0f} MB)")
        for _ in range(args.rounds):
            for workers in args.workers:
                output = folder / f"preds_{workers}.csv"
                start = time.perf_counter()
                predicted, errors = predict_files(classifier, files, output, progress=False, workers=int(workers))
                rates[workers].append(args.count / (time.perf_counter() - start))
                if errors or predicted.total() != args.count:
                    raise SystemExit(f"error: {len(errors)} of the benchmark's own images could not be read")
                csvs.setdefault(workers, output.read_text())
    if len(set(csvs.values())) != 1:
        raise SystemExit("error: the CSVs differ between worker counts")
    median = {w: statistics.median(r) for w, r in rates.items()}
    base = median[args.workers[0]]
    print(f"\n{'workers':>7} {'images/s':>9} {'speed-up':>9}")
    for workers in args.workers:
        print(f"{workers:>7} {median[workers]:>9.1f} {median[workers] / base:>8.2f}x")
    write_result({"benchmark": "predict", "machine": machine(), "count": args.count,
                  "photo": f"{args.width}x{args.height} JPEG", "classifier": "odena 3x64x64",
                  "rounds_images_per_second": rates, "median_images_per_second": median,
                  "speedup": {w: median[w] / base for w in args.workers}}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
