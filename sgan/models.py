"""The networks. Odena (2016)'s architecture (DCGAN-style convs) and Salimans et al. (2016)'s models (an MLP
pair for 28x28 grey images, the paper's conv pair at 32x32), each sized for the images: square, 1 or 3
channels, of a side in SUPPORTED_SIZES; the number of stride-2 stages follows from the side. At 28x28 grey and
32x32 they are exactly the networks of the published results. build_discriminator / build_generator choose
them from a NetworkSpec.

D is the classifier: it returns the formulation's logits (K + 1 for two-head and k-plus-one, K for k-logit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .losses import num_logits

# ------------------------------------------------------------------------------------------------ image sizes
# A side s * 2^k (s = 3, 4 or 7; k >= 2) halves exactly down to a 3x3, 4x4 or 7x7 map: G can start from such a
# map and double up to the image, and D's stride-2 stages mirror it. 7 keeps MNIST's 28 (and gives 224). The
# parameter counts stay bounded at any size (see each class); 256 bounds the compute per image.
MAX_IMAGE_SIZE = 256
SUPPORTED_SIZES = tuple(sorted(s * 2**k for s in (3, 4, 7) for k in range(2, 7) if s * 2**k <= MAX_IMAGE_SIZE))


def check_image_shape(image_shape: tuple[int, int, int]) -> None:
    """A ValueError, saying what to pass instead, unless the images are (1 or 3, N, N) with N supported."""
    channels, height, width = image_shape
    if channels not in (1, 3):
        raise ValueError(f"the networks take images with 1 (grey) or 3 (RGB) channels, not {channels}: "
                         f"use --channels 1 or 3")
    if height != width or height not in SUPPORTED_SIZES:
        sizes = ", ".join(map(str, SUPPORTED_SIZES[:-1])) + f" or {SUPPORTED_SIZES[-1]}"
        raise ValueError(f"the networks take square images of side {sizes} (3, 4 or 7 times a power of two), "
                         f"not {height}x{width}: use --image-size with one of them")


def halvings(size: int, smallest: int) -> int:
    """How many stride-2 stages take a side of `size` down to at most `smallest` (each rounds up, like a
    padded stride-2 conv): D's stage count."""
    count = 0
    while size > smallest:
        size, count = (size + 1) // 2, count + 1
    return count


def start_side(size: int, largest: int) -> int:
    """The side G starts from: `size` halved while it stays whole and above `largest`. G doubles it back."""
    while size % 2 == 0 and size > largest:
        size //= 2
    return size


def doublings(start: int, size: int) -> int:
    """How many stride-2 transposed convs take G's start side to the image's (size = start * 2^n)."""
    return (size // start).bit_length() - 1


def stage_widths(base: int, stages: int) -> list[int]:
    """Channels per stage of the odena pair: doubling from `base`, at most 8 x base (parameters stay bounded)."""
    return [base * 2 ** min(index, 3) for index in range(stages)]


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) weights (DCGAN), BatchNorm scale N(1, 0.02), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z -> linear to a start map -> (ConvTranspose2d 4x4 stride 2 + BatchNorm + ReLU) per doubling -> Conv2d 3x3
    -> tanh: images in [-1, 1].

    Rule: the start map is the image side halved while it stays whole and above 8 (8x8 at 32, 64 and 128; 7x7 at
    28; 6x6 at 48 and 96), so the linear layer stays under latent_dim x 8 x width x 64 weights. The last doubling
    has `width` channels, each earlier one twice the next, at most 8 x width: [4w, 2w, w] at 28 and 32."""

    def __init__(self, latent_dim: int = 100, width: int = 64, channels: int = 1, image_size: int = 28):
        super().__init__()
        check_image_shape((channels, image_size, image_size))
        self.latent_dim = latent_dim
        self.start = start_side(image_size, 8)
        widths = stage_widths(width, doublings(self.start, image_size) + 1)[::-1]
        self.project = nn.Linear(latent_dim, widths[0] * self.start * self.start)
        self.start_channels = widths[0]
        layers = []
        for a, b in zip(widths, widths[1:]):  # 7 -> 14 -> 28 at 28x28
            layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(b),
                       nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.Conv2d(width, channels, 3, padding=1), nn.Tanh())
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.project(z)).view(-1, self.start_channels, self.start, self.start)
        return self.net(x)

    def sample_latent(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device)


class Discriminator(nn.Module):
    """(Conv2d stride 2 + BatchNorm + LeakyReLU) per stage -> flatten -> dropout -> one linear to the logits.
    `features(x)` gives the flattened map (for feature matching), `features(x, -2)` the stage before it.

    Rule: stride-2 stages until the map is at most 4x4 (28 -> 14 -> 7 -> 4, 32 -> 16 -> 8 -> 4, 48 -> ... -> 3),
    4x4 kernels, the last one 3x3 (it takes 7 to 4); `width` channels in the first stage, doubling per stage
    up to 8 x width. The head sees at most 16 x 8 x width features, whatever the image size."""

    def __init__(self, num_classes: int, formulation: str, width: int = 32, channels: int = 1, dropout: float = 0.5,
                 batchnorm: bool = True, image_size: int = 28):
        super().__init__()
        check_image_shape((channels, image_size, image_size))
        self.num_classes = num_classes
        self.formulation = formulation
        norm = nn.BatchNorm2d if batchnorm else (lambda channels: nn.Identity())
        stages = halvings(image_size, 4)
        widths = stage_widths(width, stages)
        layers, c_in = [], channels
        for index, c_out in enumerate(widths):
            kernel = 3 if index == stages - 1 else 4
            layers += [nn.Conv2d(c_in, c_out, kernel, stride=2, padding=1, bias=False), norm(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        final = -(-image_size // 2**stages)  # each stage rounds up: 28 -> 4
        self.head = nn.Linear(widths[-1] * final * final, num_logits(formulation, num_classes))
        init_weights(self)

    @property
    def hidden_layer_count(self) -> int:
        return sum(isinstance(m, nn.Conv2d) for m in self.body)

    def features(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """A stage's output (-1: the last, the one the head sees), flattened."""
        return self.body[: 3 * feature_depth(layer, self.hidden_layer_count)](x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))


# --------------------------------------------------------------------------------- Salimans et al. (2016)
# The MNIST models of "Improved Techniques for Training GANs": an MLP discriminator with weight
# normalisation and Gaussian noise, a softplus + BatchNorm generator, data-dependent initialisation.


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) noise in training mode only."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.add_gaussian_noise(x, self.sigma) if self.training and self.sigma > 0 else x


class WNLinear(nn.Module):
    """Weight-normalised linear layer, W = g * v / ||v|| row-wise, with data-dependent initialisation.

    train_scale=False keeps g at its initial value (a buffer), as the paper's hidden layers do: only the
    direction v and the bias b learn, which keeps the feature scale that feature matching compares in check."""

    def __init__(self, in_features: int, out_features: int, init_scale: float = 1.0, train_scale: bool = True,
                 init_std: float = 0.05):
        super().__init__()
        # v's scale does not change the output, but Adam's steps are absolute: it sets how fast v turns
        self.v = nn.Parameter(torch.randn(out_features, in_features) * init_std)
        if train_scale:
            self.g = nn.Parameter(torch.ones(out_features))
        else:
            self.register_buffer("g", torch.ones(out_features))
        self.b = nn.Parameter(torch.zeros(out_features))
        self.init_scale = init_scale

    def scale(self) -> torch.Tensor:
        """g / ||v||, one factor per output feature (per row of v)."""
        return self.g / self.v.norm(dim=1).clamp_min(1e-12)

    def effective_weight(self) -> torch.Tensor:
        """g * v / ||v||, row-wise: one row per output feature (WNConv2d / WNConvTranspose2d reshape it)."""
        return self.v * self.scale().unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x v^T) * g/||v|| + b, the same as x W^T + b, without building W (and its gradient) per forward: the
        # output has fewer elements than the weight (300 x 1000 against 1000 x 784 in the first layer)
        return torch.addcmul(self.b, nn.functional.linear(x, self.v), self.scale())

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> torch.Tensor:
        """Set g and b so the outputs on this batch have zero mean and std init_scale; return the outputs."""
        self.g.fill_(1.0)
        self.b.zero_()
        y = self(x)
        # statistics per output feature (dim 1): over the batch, and over positions for conv outputs [N, C, H, W]
        per_feature = y.transpose(1, -1).reshape(-1, y.shape[1])
        mean, std = per_feature.mean(0), per_feature.std(0).clamp_min(1e-8)
        self.g.copy_(self.init_scale / std)
        self.b.copy_(-mean * self.init_scale / std)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return (y - mean.view(shape)) * (self.init_scale / std).view(shape)


def feature_depth(layer: int, count: int) -> int:
    """How many of D's `count` hidden layers run to reach feature layer `layer` (-1: the last, -count: the first)."""
    if not -count <= layer <= -1:
        raise ValueError(f"--feature-layer {layer}: this D has {count} hidden layers, so it takes -1 (the last, the "
                         f"paper's) to -{count} (the first)")
    return count + 1 + layer


class SalimansDiscriminator(nn.Module):
    """MLP 784-1000-500-250-250-250-K, weight-normalised, Gaussian noise (0.3 on the input, 0.5 after each
    hidden layer). Takes images in [-1, 1] (rescaled to [0, 1] inside, the paper's scale). `features(x)`
    is the last hidden layer (after its ReLU, before its noise), the one the paper's feature matching compares;
    `features(x, -2)` the one before, and so on."""

    HIDDEN = (1000, 500, 250, 250, 250)

    def __init__(self, num_classes: int, formulation: str = "k-logit", image_size: int = 28 * 28,
                 input_noise: float = 0.3, hidden_noise: float = 0.5):
        super().__init__()
        self.num_classes, self.formulation = num_classes, formulation
        sizes = (image_size, *self.HIDDEN)
        self.input_noise = GaussianNoise(input_noise)
        self.hidden = nn.ModuleList(WNLinear(a, b, train_scale=False, init_std=0.1)  # the paper's N(0, 0.1)
                                    for a, b in zip(sizes[:-1], sizes[1:]))
        self.noise = nn.ModuleList(GaussianNoise(hidden_noise) for _ in self.HIDDEN)
        self.head = WNLinear(sizes[-1], num_logits(formulation, num_classes), init_std=0.1)

    @property
    def hidden_layer_count(self) -> int:
        return len(self.hidden)

    def _hidden(self, x: torch.Tensor, init: bool = False, depth: int | None = None) -> torch.Tensor:
        """The output of hidden layer `depth` (default: the last), after its ReLU; noise between the layers."""
        depth = len(self.hidden) if depth is None else depth
        h = self.input_noise((x.flatten(1) + 1) / 2)
        for index, (layer, noise) in enumerate(zip(self.hidden[:depth], self.noise)):
            h = torch.relu(layer.init_from(h) if init else layer(h))
            if index < depth - 1:
                h = noise(h)
        return h

    def features(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        return self._hidden(x, depth=feature_depth(layer, self.hidden_layer_count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.noise[-1](self._hidden(x)))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation of every layer on one batch of real images."""
        self.head.init_from(self.noise[-1](self._hidden(x, init=True)))


class FastSoftplus(torch.autograd.Function):
    """log(1 + e^x) as relu(x) + log(1 + e^-|x|), gradient sigmoid(x). Torch's softplus calls a log1p that this
    CPU build does not vectorise: on 100 x 784 floats (1 thread), forward 196 us against 750, with backward 420
    against 919."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.relu(x) + torch.log(1 + torch.exp(-x.abs()))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)  # autograd through relu and |x| would give 0 at x = 0, not 1/2


def softplus(x: torch.Tensor) -> torch.Tensor:
    return FastSoftplus.apply(x)


class Softplus(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x)


class SalimansGenerator(nn.Module):
    """100-d uniform noise -> 500 softplus + BatchNorm -> 500 softplus + BatchNorm -> 784 (weight-normalised)
    -> output, in D's [0, 1] pixel scale, mapped to [-1, 1] like the data (2p - 1).

    output="sigmoid" is the paper's. The default "softplus" (pixels in [0, inf), as in Sleepychord's PyTorch
    port) learned much faster here: MNIST, 100 labels, seed 0, D's raw accuracy 87.8% / 90.0% after epochs 1 / 2
    against 79.4% / 77.1% with sigmoid, whose G stopped matching D's features (feature-matching loss 16-30
    against 0.2)."""

    OUTPUTS = {"sigmoid": torch.sigmoid, "softplus": softplus}

    def __init__(self, latent_dim: int = 100, image_shape: tuple[int, ...] = (1, 28, 28), output: str = "softplus"):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"unknown generator output {output!r}: choose one of {', '.join(self.OUTPUTS)}")
        self.latent_dim, self.image_shape, self.output = latent_dim, image_shape, output
        self.body = nn.Sequential(
            nn.Linear(latent_dim, 500, bias=False), nn.BatchNorm1d(500), Softplus(),
            nn.Linear(500, 500, bias=False), nn.BatchNorm1d(500), Softplus(),
        )
        self.out = WNLinear(500, int(torch.tensor(image_shape).prod()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (2 * self.OUTPUTS[self.output](self.out(self.body(z))) - 1).view(-1, *self.image_shape)

    def sample_latent(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, self.latent_dim, device=device)

    @torch.no_grad()
    def init_from_batch(self, z: torch.Tensor) -> None:
        self.out.init_from(self.body(z))


# ------------------------------------------------------------- Salimans et al. (2016), conv networks
# The CIFAR-10 / SVHN models of "Improved Techniques for Training GANs" (openai/improved-gan,
# train_cifar_feature_matching.py): a weight-normalised all-conv D with dropout, a BatchNorm deconv G. They are
# the paper's at 32x32; other sizes get more or fewer of the same stride-2 stages.


class WNConv2d(WNLinear):
    """Weight-normalised Conv2d with data-dependent initialisation, WNLinear's logic on the unfolded kernel.

    v is stored as [out, in * k * k]: normalising its rows is normalising each output channel's kernel, as in
    the paper. Same defaults as the paper's conv layers: g fixed after initialisation (train_scale=False)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 init_scale: float = 1.0, train_scale: bool = False):
        super().__init__(in_channels * kernel_size * kernel_size, out_channels, init_scale, train_scale)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight().view(self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        return nn.functional.conv2d(x, weight, self.b, stride=self.stride, padding=self.padding)


class WNConvTranspose2d(WNConv2d):
    """Weight-normalised ConvTranspose2d (each output channel's kernel normalised, as the paper's Deconv2D)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 output_padding: int = 0, init_scale: float = 1.0, train_scale: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, init_scale, train_scale)
        self.output_padding = output_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # conv_transpose2d takes [in, out, k, k]
        weight = self.effective_weight().view(self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        return nn.functional.conv_transpose2d(x, weight.transpose(0, 1), self.b, stride=self.stride,
                                              padding=self.padding, output_padding=self.output_padding)


class SalimansConvDiscriminator(nn.Module):
    """The paper's CIFAR-10 / SVHN D at 32x32: dropout 0.2 on the input; weight-normalised 3x3 convs
    a-a-a (stride 2), dropout 0.5, b-b-b (stride 2), dropout 0.5, b 3x3 valid, b 1x1, b 1x1, all with
    lrelu(0.2); global average pooling; a weight-normalised dense layer to the formulation's logits.
    (a, b) = widths: (96, 192) for CIFAR-10, (64, 128) in the paper's SVHN code. Takes images in [-1, 1] (the
    paper's scale). `features(x)` is the last conv layer, pooled (b features), the one the paper's feature
    matching compares; `features(x, -2)` the conv layer before it, pooled, and so on.

    Rule for other sizes: one stage (three convs, the last stride 2, then dropout) per halving until the map is
    at most 8x8, as the paper's 32 -> 16 -> 8 (48 -> 6: three stages, 128 -> 8: four); the first stage is a wide,
    the others b. Each stage past the paper's two adds 3 x 9 x b^2 weights (1M at b = 192); pooling keeps the
    head at b inputs."""

    def __init__(self, num_classes: int, formulation: str = "k-logit", channels: int = 3,
                 input_dropout: float = 0.2, dropout: float = 0.5, widths: tuple[int, int] = (96, 192),
                 image_size: int = 32):
        super().__init__()
        check_image_shape((channels, image_size, image_size))
        self.num_classes, self.formulation = num_classes, formulation
        a, b = widths

        def conv(c_in, c_out, kernel=3, stride=1, padding=1):
            return WNConv2d(c_in, c_out, kernel, stride=stride, padding=padding)

        layers, c_in = [nn.Dropout(input_dropout)], channels
        for stage in range(halvings(image_size, 8)):
            c_out = a if stage == 0 else b
            layers += [conv(c_in, c_out), conv(c_out, c_out), conv(c_out, c_out, stride=2),  # 32 -> 16 -> 8
                       nn.Dropout(dropout)]
            c_in = c_out
        layers += [conv(c_in, b, padding=0),  # 8 -> 6
                   conv(b, b, kernel=1, padding=0), conv(b, b, kernel=1, padding=0)]
        self.layers = nn.ModuleList(layers)
        self.head = WNLinear(b, num_logits(formulation, num_classes), init_scale=0.1, train_scale=True)

    @property
    def hidden_layer_count(self) -> int:
        return sum(isinstance(layer, WNConv2d) for layer in self.layers)

    def _features(self, x: torch.Tensor, init: bool = False, depth: int | None = None) -> torch.Tensor:
        """Conv layer `depth`'s output (default: the last), after its activation, globally average-pooled."""
        h, convs = x, 0
        for layer in self.layers:
            if isinstance(layer, WNConv2d):
                h = nn.functional.leaky_relu(layer.init_from(h) if init else layer(h), 0.2)
                convs += 1
                if convs == depth:
                    break
            else:
                h = layer(h)
        return h.mean(dim=(2, 3))  # global average pooling

    def features(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        return self._features(x, depth=feature_depth(layer, self.hidden_layer_count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation of every layer on one batch of real images (dropout active, as in
        the paper)."""
        self.head.init_from(self._features(x, init=True))


class SalimansConvGenerator(nn.Module):
    """The paper's CIFAR-10 / SVHN G at 32x32: 100-d uniform noise -> dense 4x4x512 + BatchNorm + ReLU -> 5x5
    deconvs (stride 2) to 256 (8x8) and 128 (16x16) channels, each + BatchNorm + ReLU -> a weight-normalised 5x5
    deconv to the image's channels (32x32), tanh: images in [-1, 1] like the data.

    Rule for other sizes: the start map is the image side halved while it stays whole and above 4 (4x4 at 32, 64
    and 128; 3x3 at 48 and 96; 7x7 at 28), 512 channels, halved at each doubling (64 -> 4: 512, 256, 128, 64):
    the dense layer has at most latent_dim x 512 x 49 weights and the deconvs shrink as the maps grow."""

    def __init__(self, latent_dim: int = 100, image_shape: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        check_image_shape(image_shape)
        channels, size = image_shape[0], image_shape[1]
        self.latent_dim, self.image_shape, self.start = latent_dim, tuple(image_shape), start_side(size, 4)
        widths = [512 >> index for index in range(doublings(self.start, size))]  # the last doubling is self.out

        def deconv(a, b):  # 5x5, stride 2: doubles the size ('half' padding plus output_padding)
            return nn.ConvTranspose2d(a, b, 5, stride=2, padding=2, output_padding=1, bias=False)

        self.project = nn.Sequential(nn.Linear(latent_dim, 512 * self.start ** 2, bias=False),
                                     nn.BatchNorm1d(512 * self.start ** 2), nn.ReLU())
        layers = []
        for a, b in zip(widths, widths[1:]):  # 4 -> 8 -> 16 at 32x32
            layers += [deconv(a, b), nn.BatchNorm2d(b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.out = WNConvTranspose2d(widths[-1], channels, 5, stride=2, padding=2, output_padding=1, init_scale=0.1,
                                     train_scale=True)  # 16 -> 32
        for m in self.modules():  # the paper's N(0, 0.05) weights
            if isinstance(m, (nn.Linear, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.05)

    def _hidden(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, 512, self.start, self.start))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(self._hidden(z)))

    def sample_latent(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, self.latent_dim, device=device)

    @torch.no_grad()
    def init_from_batch(self, z: torch.Tensor) -> None:
        self.out.init_from(self._hidden(z))


# ------------------------------------------------------------------------------------ choosing the models


@dataclass(frozen=True)
class NetworkSpec:
    """Everything the networks are built from (a run's other settings never reach this module)."""

    family: str  # "odena" (DCGAN-style convs) or "salimans" (Salimans et al.'s MLPs or convs)
    image_shape: tuple[int, int, int]  # (channels, height, width)
    num_classes: int
    formulation: str  # sets D's logit count: K + 1, or K for k-logit
    latent_dim: int = 100
    d_width: int = 32  # odena D's base channel count
    g_width: int = 32  # odena G's base channel count
    dropout: float = 0.5  # odena D, before its last linear
    d_batchnorm: bool = True  # odena D
    g_output: str = "softplus"  # salimans 28x28 G's output layer
    salimans_conv_widths: tuple[int, int] = (96, 192)  # salimans conv D's (a, b) widths


def salimans_kind(spec: NetworkSpec) -> str:
    """Which of Salimans' network pairs fits the images: "mlp" (28x28 grey, the paper's MNIST models) or "conv"."""
    return "mlp" if tuple(spec.image_shape) == (1, 28, 28) else "conv"


def build_discriminator(spec: NetworkSpec) -> nn.Module:
    """D for a spec (one place, so training and evaluation build the same network).

    salimans: the MLP for 28x28 grey images, the conv D otherwise; odena: the conv D. Both sized for the images
    (an unsupported shape is a ValueError listing SUPPORTED_SIZES)."""
    check_image_shape(spec.image_shape)  # the whole shape: the classes take one side
    channels, size = spec.image_shape[0], spec.image_shape[1]
    if spec.family == "salimans":
        if salimans_kind(spec) == "mlp":
            return SalimansDiscriminator(spec.num_classes, spec.formulation)
        return SalimansConvDiscriminator(spec.num_classes, spec.formulation, channels=channels,
                                         widths=spec.salimans_conv_widths, image_size=size)
    return Discriminator(spec.num_classes, spec.formulation, width=spec.d_width, channels=channels,
                         dropout=spec.dropout, batchnorm=spec.d_batchnorm, image_size=size)


def check_feature_layer(spec: NetworkSpec, layer: int) -> None:
    """A ValueError naming the valid range when the salimans D of `spec` has no hidden layer `layer`."""
    with torch.device("meta"):  # for its layer count only: no memory, no initialisation
        feature_depth(layer, build_discriminator(spec).hidden_layer_count)


def build_generator(spec: NetworkSpec) -> nn.Module:
    check_image_shape(spec.image_shape)
    if spec.family == "salimans":
        if salimans_kind(spec) == "mlp":
            return SalimansGenerator(spec.latent_dim, output=spec.g_output)
        return SalimansConvGenerator(spec.latent_dim, spec.image_shape)
    return Generator(spec.latent_dim, width=spec.g_width, channels=spec.image_shape[0], image_size=spec.image_shape[1])
