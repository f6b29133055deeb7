"""Opening a folder of your own images: decoding time, cache-hit time and peak memory (sgan.images).

    python benchmarks/images.py [--dir DIR] [--count 50000] [--classes 10] [--labeled-per-class 50] [--size 64]
                                [--workers N] [--batch 256] [--out benchmarks/results/images_folder_64.json]

Makes a folder of --count unlabeled RGB PNGs of --size x --size (smooth random pictures with a little noise, in
unlabeled/<thousands>/), plus labeled/<class>/ with --labeled-per-class images per class, written in parallel
under a temporary folder (or --dir, kept and reused when it already holds the same images). Then, each in a
fresh process (peak RSS from resource.getrusage):
  cold  open_folder with an empty cache: decodes every image into the cache (the workers' peak RSS too);
  warm  open_folder again (the cache hit), then reads every image of every split once, in batches, as uint8.
  train a short odena run on the folder (--train-steps), from the cache.
Target: the warm and the training process's peak RSS within the uint8 size of the images plus 1.5 GB. Prints a
table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

RESULTS = Path(__file__).resolve().parent / "results"
HEADROOM = 1.5e9  # the target: peak RSS within the uint8 images plus this


def write_images(task: tuple[str, list[str], int, int]) -> None:
    """Write one PNG per relative path: an 8x8 random picture scaled up, plus noise of +-4."""
    from PIL import Image

    root, paths, size, seed = task
    rng = np.random.default_rng(seed)
    for rel in paths:
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).resize((size, size), Image.BICUBIC)
        noisy = np.asarray(small, np.int16) + rng.integers(-4, 5, (size, size, 3), np.int16)
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, compress_level=1)


def make_folder(root: Path, args) -> float:
    """The benchmark's folder (reused when its marker says it holds these images); returns the seconds taken."""
    marker = root / ".benchmark.json"  # hidden: sgan.images ignores it
    wanted = {"count": args.count, "classes": args.classes, "labeled_per_class": args.labeled_per_class,
              "size": args.size}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    paths = [f"labeled/class_{c}/{i:03d}.png" for c in range(args.classes) for i in range(args.labeled_per_class)]
    paths += [f"unlabeled/{i // 1000:03d}/{i:05d}.png" for i in range(args.count)]
    chunk = 500
    tasks = [(str(root), paths[i:i + chunk], args.size, i) for i in range(0, len(paths), chunk)]
    started = time.perf_counter()
    with Pool(args.workers) as pool:
        pool.map(write_images, tasks, chunksize=1)
    marker.write_text(json.dumps(wanted))
    return time.perf_counter() - started


def measure_training(root: str, cache_dir: str, size: int, steps: int) -> dict:
    """In a fresh process: a short odena run on the folder (from the warm cache), the whole of training's
    memory: the images memory-mapped, the networks, the optimisers and the batches."""
    from sgan.config import parse_config
    from sgan.train import train

    os.environ["SGAN_CACHE_DIR"] = cache_dir
    with tempfile.TemporaryDirectory(prefix="sgan-bench-train-") as out:
        metrics = train(parse_config(["--dataset", f"folder:{root}", "--image-size", str(size), "--max-steps",
                                      str(steps), "--tracker", "none", "--cpu", "--checkpoint-every", "0",
                                      "--output-dir", out]))
    return {"steps": metrics["steps"], "wall_seconds": metrics["wall_seconds"],
            "images_per_second": metrics["images_per_second"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure(phase: str, root: str, cache_dir: str, size: int, workers: int, batch: int) -> dict:
    """In a fresh process: open the folder (cold: decoding, warm: the cache hit); warm then reads every image."""
    from sgan.images import open_folder

    started = time.perf_counter()
    source = open_folder(root, size, cache_dir=cache_dir, workers=workers, progress=False)
    result = {"open_seconds": time.perf_counter() - started, "cache_hit": source.cache_hit,
              "images": sum(len(s) for s in source.splits().values()), "shape": list(source.image_shape),
              "uint8_bytes": sum(s.images.nbytes for s in source.splits().values()),
              "cache_file_bytes": os.path.getsize(source.cache_file)}
    if phase == "warm":
        started, total = time.perf_counter(), 0
        for split in source.splits().values():
            for start in range(0, len(split), batch):
                images = np.array(split.images[start:start + batch])  # a uint8 batch in memory, as training reads
                total += int(images[:, :, ::8, ::8].sum())
        result.update(read_seconds=time.perf_counter() - started, checksum=total)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["workers_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


def run_phase(phase: str, root: Path, cache_dir: Path, args) -> dict:
    command = [sys.executable, __file__, "--measure", phase, "--dir", str(root), "--cache-dir", str(cache_dir),
               "--size", str(args.size), "--workers", str(args.workers), "--batch", str(args.batch),
               "--train-steps", str(args.train_steps)]
    started = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started  # with the interpreter's start and imports
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="the benchmark folder (kept; reused when it holds the same images)")
    parser.add_argument("--count", type=int, default=50000, help="unlabeled images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--labeled-per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image side, also the image_size opened at")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for writing and decoding")
    parser.add_argument("--batch", type=int, default=256, help="images per batch when reading")
    parser.add_argument("--out", default=str(RESULTS / "images_folder_64.json"))
    parser.add_argument("--train-steps", type=int, default=20, help="steps of the short training run")
    parser.add_argument("--measure", choices=["cold", "warm", "train"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure == "train":
        print(json.dumps(measure_training(args.dir, args.cache_dir, args.size, args.train_steps)))
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, args.cache_dir, args.size, args.workers, args.batch)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="sgan-bench-images-"))
    root = Path(args.dir) if args.dir else work / "data"
    try:
        generate_seconds = make_folder(root, args)
        cold = run_phase("cold", root, work / "cache", args)
        warm = run_phase("warm", root, work / "cache", args)
        training = run_phase("train", root, work / "cache", args)
        return report(args, argv, generate_seconds, cold, warm, training)
    finally:
        print(f"removing {work} ...", flush=True)  # deleting 50,000 files takes a while on some disks
        shutil.rmtree(work, ignore_errors=True)


def report(args, argv, generate_seconds: float, cold: dict, warm: dict, training: dict) -> int:
    if cold["cache_hit"] or not warm["cache_hit"]:
        raise SystemExit(f"expected a cold then a warm open, got cache hits {cold['cache_hit']}, {warm['cache_hit']}")
    target = warm["uint8_bytes"] + HEADROOM
    result = {
        "meta": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "workers": args.workers,
                 "platform": platform.platform(),
                 "command": " ".join(["python benchmarks/images.py"] + (argv if argv is not None else sys.argv[1:]))},
        "folder": {"unlabeled": args.count, "labeled": args.classes * args.labeled_per_class, "size": args.size,
                   "format": "PNG RGB", "generate_seconds": round(generate_seconds, 1)},
        "cold": cold, "warm": warm, "train": training,
        "decode_images_per_second": round(cold["images"] / cold["open_seconds"]),
        "target_peak_rss_bytes": int(target),
        "within_target": max(warm["peak_rss_bytes"], training["peak_rss_bytes"]) <= target,
    }
    gb = 1e9
    rows = [("images (labeled + unlabeled)", f"{cold['images']} x {'x'.join(map(str, cold['shape']))}"),
            ("uint8 size", f"{cold['uint8_bytes'] / gb:.3f} GB"),
            ("write the PNGs", f"{generate_seconds:.1f} s" if generate_seconds else "reused"),
            ("cold open (decode, cache write)", f"{cold['open_seconds']:.1f} s, "
                                                f"{result['decode_images_per_second']} images/s"),
            ("cold peak RSS, main / a worker", f"{cold['peak_rss_bytes'] / gb:.3f} / "
                                               f"{cold['workers_peak_rss_bytes'] / gb:.3f} GB"),
            ("warm open (cache hit)", f"{warm['open_seconds']:.2f} s"),
            ("warm: read every image once", f"{warm['read_seconds']:.2f} s in batches of {args.batch}"),
            ("warm peak RSS", f"{warm['peak_rss_bytes'] / gb:.3f} GB"),
            (f"training, {training['steps']} odena steps", f"{training['wall_seconds']:.1f} s, peak RSS "
                                                           f"{training['peak_rss_bytes'] / gb:.3f} GB"),
            ("target (uint8 size + 1.5 GB)", f"<= {target / gb:.3f} GB: "
                                             f"{'met' if result['within_target'] else 'MISSED'}")]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0 if result["within_target"] else 1

if __name__ == "__main__":
    sys.exit(main())
