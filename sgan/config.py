"""Training configuration: one dataclass, its command-line flags, and YAML config files.

Precedence: built-in defaults < recipe defaults < --config FILE < flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import DATASETS, check_dataset, check_label_budget, is_builtin, parse_num_labels
from .losses import FORMULATIONS
from .models import SUPPORTED_SIZES, NetworkSpec
from .ops import BACKENDS

RECIPES = ("odena", "supervised", "salimans")
MAX_DDP_TIMEOUT = 10**9  # seconds (31 years): Python's timedelta overflows near 10^14, torch's ms counts beyond
RENAMED = {("recipe", "seed"): "odena", ("networks", "seed"): "odena"}  # (field, old value) -> new value
# Defaults a recipe brings (below a --config file and command-line flags). salimans: Salimans et al. (2016),
# MNIST: Adam 0.003 / 0.5, batch 100, a constant lr (as the paper's code), EMA of D for evaluation. Its
# unsupervised loss is 0.5 * (real + fake) in the paper's code with unlabeled weight 1, which is
# --unlabeled-weight 0.5 here; its real term covers the unlabeled batch only (--real-rows unlabeled).
# The paper's Adam adds 1e-8 to the second moment inside the square root, which damps steps about as much
# as eps 1e-4 outside it (PyTorch's form) for the ~5e-5 gradients of D's weights.
# G's gradient is clipped (not in the paper): see RESULTS.md.
RECIPE_DEFAULTS = {
    "salimans": {"formulation": "k-logit", "lr": 0.003, "beta1": 0.5, "adam_eps": 1e-4, "batch_size": 100,
                 "unlabeled_weight": 0.5, "real_rows": "unlabeled", "lr_decay": "none", "ema_decay": 0.999,
                 "g_clip_norm": 10.0,
                 # 100 epochs (60,000 steps, ~34 min alone on the 2-core CPU of RESULTS.md at 29.5 steps/s): validation accuracy
                 # went on rising, 97.04% after 20 epochs, 98.10% after 60, 98.28% after 100 (seed 10)
                 "epochs": 100,
                 "mixed_precision": "auto"},  # bf16 products where native: 1.24x a run here, no loss on validation
}
SALIMANS_CONV_WIDTHS = {"svhn": (64, 128)}  # the paper's narrower SVHN D; other 32x32 datasets: (96, 192)
TRACKERS = ("wandb", "tensorboard", "none")
ON_RESUME = ("match", "free")  # a resumed run must keep the field's value, or may change it


def split_seed(seed, label_seed):
    """--label-seed, else --seed: the seed that chose a run's labeled and validation images (also for the
    settings a checkpoint recorded, where older ones have no label_seed)."""
    return seed if label_seed is None else label_seed


def option(default, help: str, *, resume: str, choices: tuple | None = None):
    """A TrainConfig field: its default, its --help, and whether a resumed run must keep its value."""
    assert resume in ON_RESUME, resume
    metadata = {"help": help, "resume": resume, **({"choices": choices} if choices else {})}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    dataset: str = option("mnist", f"a built-in dataset ({', '.join(DATASETS)}), folder:PATH (your images: "
                          "PATH/labeled/<class>/..., optional PATH/unlabeled/**, PATH/val/<class>/, PATH/test/<class>/) "
                          "or npz:FILE (arrays x_labeled, y_labeled, x_unlabeled, optional x_val, y_val, x_test, "
                          "y_test, class_names)", resume="match")
    image_size: int | None = option(None, "your images are centre-cropped to a square and resized to this size "
                                    "(default 32); built-in datasets keep their own", resume="match")
    channels: int | None = option(None, "1 (grey) or 3 (RGB) for your images (default: 3 if any image has "
                                  "colour)", resume="match", choices=(1, 3))
    skip_bad_images: bool = option(False, "skip unreadable images of a folder (listed in the output dir) instead of "
                                   "stopping", resume="free")
    recipe: str = option("odena", "odena: the semi-supervised conv GAN of Odena (2016); supervised: the same D "
                         "trained on the labeled images only (baseline); salimans: Salimans et al. (2016), MLP D "
                         "with weight norm and noise, feature matching", resume="match", choices=RECIPES)
    formulation: str = option("k-logit", "D's loss: two-head (K-class softmax + real/fake sigmoid), k-plus-one "
                              "(softmax over K+1, fake = K), k-logit (K logits, D = Z/(Z+1))", resume="match",
                              choices=FORMULATIONS)
    num_labels: str = option("auto", "labeled training images: N, 'all', or auto (100 for a built-in dataset, "
                             "all for your own). Built-in datasets take N / K per class (a multiple of K); your own "
                             "images a stratified subset", resume="match")
    val_size: int = option(0, "images of the labeled pool held out for validation (class-balanced, never "
                           "trained on); a folder's val/ or an npz's x_val is used as it is", resume="match")
    epochs: int = option(1, "passes over the (unlabeled) training set", resume="free")
    max_steps: int | None = option(None, "stop after this many steps, at most --epochs' worth (the lr schedule "
                                      "still spans --epochs, so the run can be resumed further)", resume="free")
    batch_size: int = option(100, "images per batch and process: each step D sees this many unlabeled, labeled "
                             "and generated images", resume="match")
    lr: float = option(2e-4, "Adam learning rate for D and G", resume="match")
    beta1: float = option(0.5, "Adam beta1", resume="match")
    adam_eps: float = option(1e-8, "Adam epsilon, added to sqrt(second moment). Larger values shrink the steps of "
                             "parameters whose gradients are smaller than it", resume="match")
    lr_decay: str = option("none", "learning-rate schedule: none, or linear (to 0 at the end of --epochs; "
                           "--max-steps does not change it)", resume="match", choices=("none", "linear"))
    lr_decay_start: float = option(0.0, "with --lr-decay linear: the fraction of --epochs run at the full lr "
                                   "before the decay starts (0: from the first step; the paper's CIFAR-10 code "
                                   "holds for 2/3)", resume="match")
    ema_decay: float = option(0.0, "exponential moving average of D's weights, used for evaluation (0: off; "
                              "salimans: 0.999)", resume="match")
    networks: str = option("auto", "the D and G architectures: odena (conv, DCGAN-style) or salimans (Salimans "
                           "et al.: MLPs for 28x28 grey images, convs for 32x32 RGB); auto: salimans for --recipe "
                           "salimans, else odena. --recipe supervised --networks salimans is the supervised "
                           "baseline of the salimans recipe", resume="match", choices=("auto", "odena", "salimans"))
    g_output: str = option("softplus", "output layer of the salimans 28x28 G: softplus (default, learns faster "
                           "here) or sigmoid (the paper's)", resume="match", choices=("softplus", "sigmoid"))
    unlabeled_weight: float = option(1.0, "weight of the real/fake (unsupervised) D loss", resume="match")
    entropy_weight: float = option(0.0, "weight of the entropy of D's class prediction on unlabeled images, "
                                   "which rewards confident predictions there (0: off)", resume="match")
    real_rows: str = option("all", "real images in D's real term: all (labeled and unlabeled) or unlabeled (the "
                            "paper's code; the labeled ones then only enter the cross-entropy)", resume="match",
                            choices=("all", "unlabeled"))
    g_clip_norm: float = option(0.0, "clip G's gradient to this norm (0: off). One huge G gradient fills Adam's "
                                "second moment and stalls G for thousands of steps", resume="match")
    feature_layer: int = option(-1, "the D layer whose mean features G matches (salimans recipe): -1 the last "
                                "hidden layer (the paper's), -2 the one before, and so on", resume="match")
    g_steps: int = option(1, "G updates per D update, each on fresh noise", resume="match")
    seed: int = option(0, "seed for the labeled subset (unless --label-seed), initialisation and batches",
                       resume="match")
    label_seed: int | None = option(None, "seed for which images are labeled and which are held out for "
                                    "validation (default: --seed). Fix it to vary only initialisation and batches "
                                    "with --seed: two sources of spread, measured apart", resume="match")
    output_dir: str = option("runs/default", "where the run writes its files", resume="free")
    data_root: str | None = option(None, "data root (default: $SGAN_DATA_ROOT or ./data)", resume="free")
    tracker: str = option("wandb", "experiment tracker (wandb runs offline, under the output dir, when no API key "
                          "is set)", resume="free", choices=TRACKERS)
    loss_backend: str = option("auto", "D-loss implementation: auto (fused op when available), cpp, cuda or torch "
                               "(default from $SGAN_LOSS_BACKEND)", resume="free", choices=BACKENDS)
    cpu: bool = option(False, "train on the CPU even when a GPU is visible", resume="free")
    latent_dim: int = option(100, "size of G's input noise", resume="match")
    g_width: int = option(32, "G's base channel count", resume="match")
    d_width: int = option(32, "D's base channel count", resume="match")
    dropout: float = option(0.5, "dropout before D's last linear", resume="match")
    freeze_bn_on_fakes: bool = option(True, "keep generated batches out of D's BatchNorm running statistics (used "
                                      "at test time)", resume="match")
    d_batchnorm: bool = option(True, "BatchNorm in D (false makes D's output independent of how a batch is split: "
                               "tests, ablations)", resume="match")
    mixed_precision: str = option("no", "autocast through accelerate; the loss still accumulates in float32. "
                                  "auto: bf16 where the hardware multiplies bf16 matrices natively (a CUDA GPU "
                                  "with bf16, a CPU with AVX512-BF16 or AMX), else no", resume="free",
                                  choices=("no", "bf16", "fp16", "auto"))
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs (CUDA only)", resume="free")
    checkpoint_every: int = option(500, "steps between checkpoints (0: only at the end); a run also checkpoints on "
                                   "SIGTERM/SIGINT", resume="free")
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", resume="free")
    resume: str | None = option(None, "continue from 'latest' (the newest checkpoint under --output-dir) or a "
                                "checkpoint folder", resume="free")
    overwrite: bool = option(False, "start a new run in an --output-dir that holds one: its checkpoints and "
                             "outputs are deleted first", resume="free")
    ddp_timeout: int = option(600, "seconds a process waits for the others in a collective before the job fails",
                              resume="free")
    eval_batch_size: int = option(1000, "batch size for test-set evaluation", resume="free")
    log_every: int = option(50, "steps between reads of the losses: progress bar, tracker and the finiteness "
                            "check", resume="free")

    def validate(self) -> None:
        """Raise ValueError with the flag to fix for values argparse cannot check."""
        for (name, old), new in RENAMED.items():
            if getattr(self, name) == old:
                raise ValueError(f"{_flag(name)} {old} is now {_flag(name)} {new} (the paper's name; --seed is the "
                                 "random seed)")
        num_labels = parse_num_labels(self.num_labels, is_builtin(self.dataset))
        check_dataset(self.dataset)
        for f in dataclasses.fields(self):  # argparse does not check choices of values from a --config file
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value not in choices and not (value is None and f.default is None):
                raise ValueError(f"{_flag(f.name)} {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (0 <= self.beta1 < 1, "--beta1 must be in [0, 1)"),
            (self.adam_eps > 0, "--adam-eps must be > 0 (try 1e-8, PyTorch's default)"),
            (self.unlabeled_weight >= 0, "--unlabeled-weight must be >= 0"),
            (self.entropy_weight >= 0, "--entropy-weight must be >= 0"),
            (self.entropy_weight == 0 or self.recipe != "supervised",
             "--entropy-weight acts on unlabeled images, which the supervised recipe does not use: drop it"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
            (0 <= self.lr_decay_start < 1, "--lr-decay-start must be in [0, 1) (a fraction of --epochs)"),
            (self.g_clip_norm >= 0, "--g-clip-norm must be >= 0 (0 turns clipping off)"),
            (self.feature_layer <= -1, "--feature-layer counts back from D's last hidden layer: -1 (the paper's), "
                                       "-2, ..."),
            (self.feature_layer == -1 or self.recipe == "salimans",
             f"--feature-layer chooses the layer the salimans recipe's G matches; the {self.recipe} recipe's G does "
             "not match features: drop it"),
            (self.g_steps >= 1, "--g-steps must be >= 1"),
            (self.g_steps == 1 or self.recipe != "supervised",
             "--g-steps sets G's updates, and the supervised recipe has no G: drop it"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
            (self.val_size >= 0, "--val-size must be >= 0"),
            (self.image_size is None or self.image_size in SUPPORTED_SIZES,
             f"--image-size {self.image_size}: the networks take {', '.join(map(str, SUPPORTED_SIZES))}"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (1 <= self.ddp_timeout <= MAX_DDP_TIMEOUT, "--ddp-timeout must be in [1, 10^9] seconds"),
            (0 <= self.seed < 2**64, "--seed must be in [0, 2^64): torch's generators take 64-bit seeds"),
            (self.label_seed is None or 0 <= self.label_seed < 2**64, "--label-seed must be in [0, 2^64)"),
            (min(self.latent_dim, self.g_width, self.d_width) >= 1, "--latent-dim, --g-width, --d-width must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if is_builtin(self.dataset):
            info = DATASETS[self.dataset]
            check_label_budget(num_labels, info.num_classes)
            if num_labels is not None and num_labels + self.val_size > info.train_size:
                raise ValueError(f"--num-labels {num_labels}{f' + --val-size {self.val_size}' if self.val_size else ''}"
                                 f" is more than {self.dataset}'s {info.train_size} training images")

    def split_seed(self) -> int:
        """The seed that chooses the labeled subset and the validation set: --label-seed, else --seed."""
        return split_seed(self.seed, self.label_seed)

    def network_family(self) -> str:
        """odena or salimans: --networks, or the recipe's own when it is auto."""
        if self.networks != "auto":
            return self.networks
        return "salimans" if self.recipe == "salimans" else "odena"

    def network_spec(self, image_shape: tuple[int, int, int], num_classes: int) -> NetworkSpec:
        """What models.py builds D and G from: the images, the classes and the network flags."""
        return NetworkSpec(self.network_family(), tuple(image_shape), num_classes, self.formulation,
                           latent_dim=self.latent_dim, d_width=self.d_width, g_width=self.g_width,
                           dropout=self.dropout, d_batchnorm=self.d_batchnorm, g_output=self.g_output,
                           salimans_conv_widths=SALIMANS_CONV_WIDTHS.get(self.dataset, (96, 192)))

    @classmethod
    def fields_to_match_on_resume(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["resume"] == "match")

    @classmethod
    def field_defaults(cls) -> dict:
        """Each field's own default (below recipes, config files and flags)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


LAUNCHED_AS = "accelerate launch launch/train.py"  # how the usage line names the command


def build_parser(prog: str = LAUNCHED_AS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a semi-supervised GAN (or the supervised baseline) and evaluate it on the test set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of flag values (keys as flag names); "
                        "flags given on the command line override it")
    for f in dataclasses.fields(TrainConfig):
        kwargs = {"default": f.default, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.type in ("bool",):
            if f.name in ("cpu", "overwrite"):
                kwargs["action"] = "store_true"
            else:
                kwargs.update(type=_parse_bool, metavar="BOOL", nargs="?", const=True)  # a bare flag is true
        elif f.type in ("int",):
            kwargs["type"] = int
        elif f.type in ("int | None",):
            kwargs["type"] = int
        elif f.type in ("float",):
            kwargs["type"] = float
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def load_yaml_config(path: str) -> dict:
    """Read a YAML config; unknown keys are an error naming them."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for f in dataclasses.fields(TrainConfig):
        if f.name in values:
            values[f.name] = _typed_yaml_value(f, values[f.name], path)
    return values


def _finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def _typed_yaml_value(f: dataclasses.Field, value, path: str):
    """A YAML value checked against the field's type (argparse never sees file values): 2.5 is no step count,
    true is no number, null only where the flag has no default."""
    kind = f.type.replace(" | None", "")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is None and "None" in f.type:
        return None
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and number and isinstance(value, int):
        return value
    if kind == "float" and number:
        return float(value)
    if kind == "float" and isinstance(value, str) and (parsed := _finite_float(value)) is not None:
        return parsed  # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string
    if kind == "str" and (isinstance(value, str) or (number and isinstance(value, int))):  # num_labels: 100
        return str(value)
    problem = yaml.safe_dump(value, default_flow_style=True).splitlines()[0]  # as the file spells it
    expected = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(kind, "a string")
    raise ValueError(f"--config {path}: {f.name}: {problem} is not {expected}"
                     f"{' (or null)' if 'None' in f.type else ''}")


def parse_config(argv: list[str] | None = None, prog: str = LAUNCHED_AS) -> TrainConfig:
    """Flags (and an optional YAML file) -> a validated TrainConfig. Exits with a usage message on errors."""
    parser = build_parser(prog)
    given = sys.argv[1:] if argv is None else argv
    for (name, old), new in RENAMED.items():  # before argparse, which would only say "invalid choice"
        if [_flag(name), old] in [given[i:i + 2] for i in range(len(given))] or f"{_flag(name)}={old}" in given:
            parser.error(f"{_flag(name)} {old} is now {_flag(name)} {new} (the paper's name; --seed is the random "
                         "seed)")
    args = parser.parse_args(argv)
    file_values = {}
    if args.config:
        try:
            file_values = load_yaml_config(args.config)
        except ValueError as error:
            parser.error(str(error))
    # the recipe as finally chosen (flag, else file, else default) brings its defaults, below file and flags
    recipe_flag = any(a == "--recipe" or a.startswith("--recipe=") for a in given)
    recipe = args.recipe if recipe_flag else file_values.get("recipe", args.recipe)
    parser.set_defaults(**RECIPE_DEFAULTS.get(recipe, {}))
    parser.set_defaults(**file_values)
    args = parser.parse_args(argv)  # command-line flags still win over both
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["num_labels"] = str(values["num_labels"])
    config = TrainConfig(**values)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config
