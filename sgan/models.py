"""The networks. Odena (2016)'s architecture (DCGAN-style convs), sized for the images (28x28 grey or 32x32
RGB), and Salimans et al. (2016)'s models: an MLP pair for 28x28 grey images, a conv pair for 32x32 RGB.
build_discriminator / build_generator choose them from a NetworkSpec.

G: z -> linear -> 2 x (ConvTranspose2d + BatchNorm + ReLU) -> Conv2d -> tanh, images in [-1, 1].
D: 3 x (Conv2d + BatchNorm + LeakyReLU) -> dropout -> one linear to the formulation's logits
   (K + 1 for two-head and k-plus-one, K for k-logit). D is the classifier.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .losses import num_logits


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
    def __init__(self, latent_dim: int = 100, width: int = 64, channels: int = 1, image_size: int = 28):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the odena generator doubles its size twice: the image size must be a multiple of 4, "
                             f"got {image_size}")
        self.latent_dim = latent_dim
        self.start = image_size // 4
        self.project = nn.Linear(latent_dim, 4 * width * self.start * self.start)
        self.width = width
        self.net = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1, bias=False),  # 7 -> 14 (28x28)
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),  # 14 -> 28
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.project(z)).view(-1, 4 * self.width, self.start, self.start)
        return self.net(x)

    def sample_latent(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device)


class Discriminator(nn.Module):
    """Returns logits; `features(x)` gives the penultimate features (for feature matching)."""

    def __init__(self, num_classes: int, formulation: str, width: int = 32, channels: int = 1, dropout: float = 0.5,
                 batchnorm: bool = True, image_size: int = 28):
        super().__init__()
        self.num_classes = num_classes
        self.formulation = formulation
        norm = nn.BatchNorm2d if batchnorm else (lambda channels: nn.Identity())
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1, bias=False),  # 28 -> 14
            norm(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),  # 14 -> 7
            norm(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False),  # 7 -> 4
            norm(4 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        final = (image_size // 2 // 2 + 1) // 2  # after the three stride-2 convs: 28 -> 4, 32 -> 4
        self.head = nn.Linear(4 * width * final * final, num_logits(formulation, num_classes))
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

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
        return x + self.sigma * torch.randn_like(x) if self.training and self.sigma > 0 else x


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

    def effective_weight(self) -> torch.Tensor:
        """g * v / ||v||, row-wise: one row per output feature (WNConv2d / WNConvTranspose2d reshape it)."""
        return self.v * (self.g / self.v.norm(dim=1).clamp_min(1e-12)).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight(), self.b)

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


class SalimansDiscriminator(nn.Module):
    """MLP 784-1000-500-250-250-250-K, weight-normalised, Gaussian noise (0.3 on the input, 0.5 after each
    hidden layer). Takes images in [-1, 1] (rescaled to [0, 1] inside, the paper's scale). `features(x)`
    is the last hidden layer, the one feature matching compares."""

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

    def _hidden(self, x: torch.Tensor, init: bool = False) -> torch.Tensor:
        h = self.input_noise((x.flatten(1) + 1) / 2)
        for index, (layer, noise) in enumerate(zip(self.hidden, self.noise)):
            h = torch.relu(layer.init_from(h) if init else layer(h))
            if index < len(self.hidden) - 1:
                h = noise(h)
        return h

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._hidden(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.noise[-1](self._hidden(x)))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation of every layer on one batch of real images."""
        self.head.init_from(self.noise[-1](self._hidden(x, init=True)))


class SalimansGenerator(nn.Module):
    """100-d uniform noise -> 500 softplus + BatchNorm -> 500 softplus + BatchNorm -> 784 (weight-normalised)
    -> output, in D's [0, 1] pixel scale, mapped to [-1, 1] like the data (2p - 1).

    output="sigmoid" is the paper's. The default "softplus" (pixels in [0, inf), as in Sleepychord's PyTorch
    port) learned much faster here: MNIST, 100 labels, seed 0, D's raw accuracy 87.8% / 90.0% after epochs 1 / 2
    against 79.4% / 77.1% with sigmoid, whose G stopped matching D's features (feature-matching loss 16-30
    against 0.2)."""

    OUTPUTS = {"sigmoid": torch.sigmoid, "softplus": nn.functional.softplus}

    def __init__(self, latent_dim: int = 100, image_shape: tuple[int, ...] = (1, 28, 28), output: str = "softplus"):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"unknown generator output {output!r}: choose one of {', '.join(self.OUTPUTS)}")
        self.latent_dim, self.image_shape, self.output = latent_dim, image_shape, output
        self.body = nn.Sequential(
            nn.Linear(latent_dim, 500, bias=False), nn.BatchNorm1d(500), nn.Softplus(),
            nn.Linear(500, 500, bias=False), nn.BatchNorm1d(500), nn.Softplus(),
        )
        self.out = WNLinear(500, int(torch.tensor(image_shape).prod()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (2 * self.OUTPUTS[self.output](self.out(self.body(z))) - 1).view(-1, *self.image_shape)

    def sample_latent(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, self.latent_dim, device=device)

    @torch.no_grad()
    def init_from_batch(self, z: torch.Tensor) -> None:
        self.out.init_from(self.body(z))


# ------------------------------------------------------------- Salimans et al. (2016), 32x32 RGB images
# The CIFAR-10 / SVHN models of "Improved Techniques for Training GANs" (openai/improved-gan,
# train_cifar_feature_matching.py): a weight-normalised all-conv D with dropout, a BatchNorm deconv G.


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
    """The paper's CIFAR-10 / SVHN D for 32x32 images: dropout 0.2 on the input; weight-normalised 3x3 convs
    a-a-a (stride 2), dropout 0.5, b-b-b (stride 2), dropout 0.5, b 3x3 valid, b 1x1, b 1x1, all with
    lrelu(0.2); global average pooling; a weight-normalised dense layer to the formulation's logits.
    (a, b) = widths: (96, 192) for CIFAR-10, (64, 128) in the paper's SVHN code. Takes images in [-1, 1] (the
    paper's scale). `features(x)` is the pooled layer (b features), the one feature matching compares."""

    def __init__(self, num_classes: int, formulation: str = "k-logit", channels: int = 3,
                 input_dropout: float = 0.2, dropout: float = 0.5, widths: tuple[int, int] = (96, 192)):
        super().__init__()
        self.num_classes, self.formulation = num_classes, formulation
        a, b = widths

        def conv(c_in, c_out, kernel=3, stride=1, padding=1):
            return WNConv2d(c_in, c_out, kernel, stride=stride, padding=padding)

        self.layers = nn.ModuleList([
            nn.Dropout(input_dropout),
            conv(channels, a), conv(a, a), conv(a, a, stride=2),  # 32 -> 16
            nn.Dropout(dropout),
            conv(a, b), conv(b, b), conv(b, b, stride=2),  # 16 -> 8
            nn.Dropout(dropout),
            conv(b, b, padding=0),  # 8 -> 6
            conv(b, b, kernel=1, padding=0), conv(b, b, kernel=1, padding=0),
        ])
        self.head = WNLinear(b, num_logits(formulation, num_classes), init_scale=0.1, train_scale=True)

    def _features(self, x: torch.Tensor, init: bool = False) -> torch.Tensor:
        h = x
        for layer in self.layers:
            if isinstance(layer, WNConv2d):
                h = nn.functional.leaky_relu(layer.init_from(h) if init else layer(h), 0.2)
            else:
                h = layer(h)
        return h.mean(dim=(2, 3))  # global average pooling

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._features(x))

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation of every layer on one batch of real images (dropout active, as in
        the paper)."""
        self.head.init_from(self._features(x, init=True))


class SalimansConvGenerator(nn.Module):
    """The paper's CIFAR-10 / SVHN G: 100-d uniform noise -> dense 4x4x512 + BatchNorm + ReLU -> 5x5 deconvs
    (stride 2) to 256 (8x8) and 128 (16x16) channels, each + BatchNorm + ReLU -> a weight-normalised 5x5 deconv
    to the image's channels (32x32), tanh: images in [-1, 1] like the data."""

    def __init__(self, latent_dim: int = 100, image_shape: tuple[int, int, int] = (3, 32, 32)):
        super().__init__()
        channels, size = image_shape[0], image_shape[1]
        if size % 8 or image_shape[1] != image_shape[2]:
            raise ValueError(f"the conv generator doubles its size three times: it needs square images whose "
                             f"side is a multiple of 8, got {tuple(image_shape)}")
        self.latent_dim, self.image_shape, self.start = latent_dim, tuple(image_shape), size // 8

        def deconv(a, b):  # 5x5, stride 2: doubles the size ('half' padding plus output_padding)
            return nn.ConvTranspose2d(a, b, 5, stride=2, padding=2, output_padding=1, bias=False)

        self.project = nn.Sequential(nn.Linear(latent_dim, 512 * self.start ** 2, bias=False),
                                     nn.BatchNorm1d(512 * self.start ** 2), nn.ReLU())
        self.body = nn.Sequential(
            deconv(512, 256), nn.BatchNorm2d(256), nn.ReLU(),  # 4 -> 8
            deconv(256, 128), nn.BatchNorm2d(128), nn.ReLU(),  # 8 -> 16
        )
        self.out = WNConvTranspose2d(128, channels, 5, stride=2, padding=2, output_padding=1, init_scale=0.1,
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
    salimans_conv_widths: tuple[int, int] = (96, 192)  # salimans 32x32 D's (a, b) widths


def salimans_kind(spec: NetworkSpec) -> str:
    """Which of Salimans' network pairs fits the images: "mlp" (28x28 grey) or "conv" (32x32); else an error."""
    shape = tuple(spec.image_shape)
    if shape == (1, 28, 28):
        return "mlp"
    if shape[1:] == (32, 32):
        return "conv"
    raise ValueError(f"the salimans networks are for 28x28 grey and 32x32 images, not {shape}: use --networks odena")


def build_discriminator(spec: NetworkSpec) -> nn.Module:
    """D for a spec (one place, so training and evaluation build the same network).

    salimans: the MLP for 28x28 grey images, the conv D for 32x32 ones; odena: the conv D sized for the images."""
    channels, size = spec.image_shape[0], spec.image_shape[1]
    if spec.family == "salimans":
        if salimans_kind(spec) == "mlp":
            return SalimansDiscriminator(spec.num_classes, spec.formulation)
        return SalimansConvDiscriminator(spec.num_classes, spec.formulation, channels=channels,
                                         widths=spec.salimans_conv_widths)
    return Discriminator(spec.num_classes, spec.formulation, width=spec.d_width, channels=channels,
                         dropout=spec.dropout, batchnorm=spec.d_batchnorm, image_size=size)


def build_generator(spec: NetworkSpec) -> nn.Module:
    if spec.family == "salimans":
        if salimans_kind(spec) == "mlp":
            return SalimansGenerator(spec.latent_dim, output=spec.g_output)
        return SalimansConvGenerator(spec.latent_dim, spec.image_shape)
    return Generator(spec.latent_dim, width=spec.g_width, channels=spec.image_shape[0], image_size=spec.image_shape[1])
