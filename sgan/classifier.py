"""A trained run's classifier, for new images: ``sgan.load_classifier(RUN)``.

    import sgan

    classifier = sgan.load_classifier("runs/mnist-100")        # a run's output dir or a checkpoint folder
    classifier.class_names                                      # ('0', '1', ..., '9')
    classifier.predict(["a.png", "b.jpg"])                      # ['7', '2']
    classifier.predict_proba(uint8_images)                      # Tensor [N, K], rows sum to 1

The classifier is the run's D (D's moving average when the recipe keeps one), rebuilt from the run's files as
``python -m sgan.evaluate`` rebuilds it: nothing loaded executes code, and the weights' own record of their
dataset, classes and image shape is checked against config.yaml. Images are prepared as training prepared
them: files and PIL images are decoded and fitted by ``sgan.images.load_image``, uint8 pixels are scaled to
[-1, 1] by ``sgan.data.to_model_scale``. The class probabilities are the softmax over the K class logits, for
every formulation (k-plus-one and two-head leave their real/fake output out).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import to_model_scale
from .evaluate import build_models, open_run, pick_device
from .images import ImageError, load_image
from .losses import class_logits


class Classifier(nn.Module):
    """D as a classifier of K classes. ``forward`` takes float images in the training scale and returns the K
    class logits; ``predict`` and ``predict_proba`` take any of the inputs ``prepare`` accepts."""

    def __init__(self, discriminator: nn.Module, formulation: str, class_names, image_shape, source: str = ""):
        super().__init__()
        self.discriminator = discriminator
        self.formulation = formulation
        self.class_names = tuple(class_names)
        self.image_shape = tuple(image_shape)  # (channels, height, width) the classifier takes
        self.source = source  # the run or checkpoint it was loaded from, for messages
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float images [N, C, H, W] in [-1, 1] -> the K class logits [N, K]."""
        return class_logits(self.discriminator(images), self.formulation)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare(self, images) -> torch.Tensor:
        """Images as the network takes them: float [N, C, H, W] in [-1, 1] on the classifier's device.

        Accepted: a file path or PIL image, a list of them (mixed is fine), a uint8 tensor or numpy array
        [N, C, H, W] at the classifier's size, or a float one already in the training scale [-1, 1] (a float
        batch with no value below 0 gets a warning: it may be in torchvision's ToTensor scale, [0, 1])."""
        if isinstance(images, (str, os.PathLike)) or _is_pil(images):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise ImageError("no images given: pass file paths, PIL images, or a tensor [N, C, H, W]")
            if all(isinstance(x, (str, os.PathLike)) or _is_pil(x) for x in images):
                channels, size, _ = self.image_shape
                images = np.stack([load_image(x, size, channels) for x in images])
            else:
                kinds = sorted({type(x).__name__ for x in images})
                raise ImageError(f"a list of {', '.join(kinds)}: a list holds file paths or PIL images; pass "
                                 "pixels as one tensor [N, C, H, W]")
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise ImageError(f"cannot classify a {type(images).__name__}: pass file paths, PIL images, or a "
                             "tensor [N, C, H, W] (uint8, or float in [-1, 1])")
        self._check_shape(images)
        if images.dtype == torch.uint8:
            return to_model_scale(images.to(self.device))
        if not images.is_floating_point():
            raise ImageError(f"images of dtype {images.dtype}: pass uint8 pixels (0..255) or floats in the "
                             "training scale [-1, 1]")
        images = images.to(self.device, torch.float32)
        if not images.isfinite().all():  # NaN passes any range test: it would get a class, and NaN probabilities
            bad = int((~images.isfinite()).flatten(1).any(dim=1).sum())
            raise ImageError(f"{bad} of the {len(images)} images hold NaN or infinite values: pass finite pixels "
                             "(uint8 0..255, or floats in [-1, 1])")
        if images.numel() and (images.min() < -1 or images.max() > 1):
            raise ImageError(f"float images range over [{images.min():.3g}, {images.max():.3g}], outside the "
                             "training scale [-1, 1]: pass uint8 pixels, or x / 127.5 - 1 for values in 0..255")
        if images.numel() and images.min() >= 0:  # the training scale puts every dark pixel below 0
            warnings.warn("float images with no value below 0: if they are in [0, 1], as torchvision's ToTensor "
                          "makes them, they are read as the training scale [-1, 1] and the classes will be wrong: "
                          "pass x * 2 - 1, or uint8 pixels (x * 255).round().to(torch.uint8), or the files",
                          UserWarning, stacklevel=4)
        return images

    def _check_shape(self, images: torch.Tensor) -> None:
        expected = "x".join(map(str, self.image_shape))
        if images.dim() == 3 and tuple(images.shape) == self.image_shape:
            raise ImageError(f"one image of shape {tuple(images.shape)}: add the batch dimension, "
                             "images[None] ([1, C, H, W])")
        if images.dim() != 4:
            raise ImageError(f"images of shape {tuple(images.shape)}: the classifier takes [N, C, H, W] with "
                             f"C x H x W = {expected}")
        if tuple(images.shape[1:]) != self.image_shape:
            hint = " (channels last? use images.permute(0, 3, 1, 2))" if images.shape[3] == self.image_shape[0] \
                else ""
            raise ImageError(f"images of shape {tuple(images.shape)}: the classifier takes C x H x W = {expected}"
                             f"{hint}; pass file paths or PIL images to have them fitted as training did")

    @torch.no_grad()
    def logits(self, images, batch_size: int = 256) -> torch.Tensor:
        """The K class logits [N, K] (float32, on the CPU), computed in eval mode, batch_size images at a time."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: it must be a whole number of images, 1 or more")
        if isinstance(images, (list, tuple)) and len(images) > batch_size:  # decode the files one batch at a time
            return torch.cat([self.logits(images[i:i + batch_size], batch_size)
                              for i in range(0, len(images), batch_size)])
        x = self.prepare(images)
        was_training = self.training
        self.eval()  # dropout, noise and BatchNorm batch statistics are for training only
        try:
            return torch.cat([self(chunk).float().cpu() for chunk in x.split(batch_size)]) if len(x) else \
                torch.empty(0, len(self.class_names))
        finally:
            self.train(was_training)

    def predict_proba(self, images, batch_size: int = 256) -> torch.Tensor:
        """Class probabilities [N, K] (the softmax over the K class logits), in the order of class_names."""
        return self.logits(images, batch_size).softmax(dim=1)

    def predict(self, images, batch_size: int = 256) -> list[str]:
        """The most probable class name of each image."""
        return [self.class_names[k] for k in self.logits(images, batch_size).argmax(dim=1).tolist()]


def _is_pil(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def load_classifier(path, device: str | torch.device = "cpu") -> Classifier:
    """The classifier of a run (its output dir) or of a checkpoint folder (OUTPUT/checkpoints/step_*), in eval
    mode on `device` ("cpu", "cuda", "auto": the GPU when one is visible). Raises EvaluationError, naming the
    file, for a folder that is neither, damaged weights, or a config.yaml that disagrees with the weights."""
    source, config, record = open_run(Path(path))
    discriminator, _ = build_models(source, config, record, pick_device(str(device)), with_generator=False)
    return Classifier(discriminator, config.formulation, record.class_names, record.image_shape, str(source.path))
