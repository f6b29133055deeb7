"""The seed architecture for 28x28 grey images (DCGAN-style, Odena 2016).

G: z -> linear -> 2 x (ConvTranspose2d + BatchNorm + ReLU) -> Conv2d -> tanh, images in [-1, 1].
D: 3 x (Conv2d + BatchNorm + LeakyReLU) -> dropout -> one linear to the formulation's logits
   (K + 1 for two-head and k-plus-one, K for k-logit). D is the classifier.
"""
from __future__ import annotations

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
    def __init__(self, latent_dim: int = 100, width: int = 64, channels: int = 1):
        super().__init__()
        self.latent_dim = latent_dim
        self.project = nn.Linear(latent_dim, 4 * width * 7 * 7)
        self.width = width
        self.net = nn.Sequential(
            nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1, bias=False),  # 7 -> 14
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
        x = torch.relu(self.project(z)).view(-1, 4 * self.width, 7, 7)
        return self.net(x)

    def sample_latent(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device)


class Discriminator(nn.Module):
    """Returns logits; `features(x)` gives the penultimate features (for feature matching)."""

    def __init__(self, num_classes: int, formulation: str, width: int = 32, channels: int = 1, dropout: float = 0.5,
                 batchnorm: bool = True):
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
        self.head = nn.Linear(4 * width * 4 * 4, num_logits(formulation, num_classes))
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

    def __init__(self, in_features: int, out_features: int, init_scale: float = 1.0, train_scale: bool = True):
        super().__init__()
        self.v = nn.Parameter(torch.randn(out_features, in_features) * 0.05)
        if train_scale:
            self.g = nn.Parameter(torch.ones(out_features))
        else:
            self.register_buffer("g", torch.ones(out_features))
        self.b = nn.Parameter(torch.zeros(out_features))
        self.init_scale = init_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.v * (self.g / self.v.norm(dim=1).clamp_min(1e-12)).unsqueeze(1)
        return nn.functional.linear(x, weight, self.b)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> torch.Tensor:
        """Set g and b so the outputs on this batch have zero mean and std init_scale; return the outputs."""
        self.g.fill_(1.0)
        self.b.zero_()
        y = self(x)
        mean, std = y.mean(0), y.std(0).clamp_min(1e-8)
        self.g.copy_(self.init_scale / std)
        self.b.copy_(-mean * self.init_scale / std)
        return (y - mean) * (self.init_scale / std)


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
        self.hidden = nn.ModuleList(WNLinear(a, b, train_scale=False) for a, b in zip(sizes[:-1], sizes[1:]))
        self.noise = nn.ModuleList(GaussianNoise(hidden_noise) for _ in self.HIDDEN)
        self.head = WNLinear(sizes[-1], num_logits(formulation, num_classes))

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
    """100-d uniform noise -> 500 softplus + BatchNorm -> 500 softplus + BatchNorm -> 784 sigmoid (weight-
    normalised), returned in [-1, 1] like the data."""

    def __init__(self, latent_dim: int = 100, image_shape: tuple[int, ...] = (1, 28, 28)):
        super().__init__()
        self.latent_dim, self.image_shape = latent_dim, image_shape
        self.body = nn.Sequential(
            nn.Linear(latent_dim, 500, bias=False), nn.BatchNorm1d(500), nn.Softplus(),
            nn.Linear(500, 500, bias=False), nn.BatchNorm1d(500), nn.Softplus(),
        )
        self.out = WNLinear(500, int(torch.tensor(image_shape).prod()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (2 * torch.sigmoid(self.out(self.body(z))) - 1).view(-1, *self.image_shape)

    def sample_latent(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, self.latent_dim, device=device)

    @torch.no_grad()
    def init_from_batch(self, z: torch.Tensor) -> None:
        self.out.init_from(self.body(z))


def build_discriminator(config, num_classes: int) -> nn.Module:
    """D for a TrainConfig's recipe (one place, so training and evaluation build the same network)."""
    if config.recipe == "salimans":
        return SalimansDiscriminator(num_classes, config.formulation)
    return Discriminator(num_classes, config.formulation, width=config.d_width, dropout=config.dropout,
                         batchnorm=config.d_batchnorm)


def build_generator(config) -> nn.Module:
    if config.recipe == "salimans":
        return SalimansGenerator(config.latent_dim)
    return Generator(config.latent_dim, width=config.g_width)
