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

    def sample_latent(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device, generator=generator)


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
