"""A small CNN for images of any size, for forks whose images are not TinyData's 32 x 32.

TinyConv's linear layer takes exactly 16 x 3 x 3 features, so it takes only 32 x 32 images
(a 48 x 48 image gives 16 x 5 x 5 = 400 features and fails). TinyConvAnySize keeps TinyConv's
two strided convs and averages each of the 16 channels over the whole image before the
linear layer (adaptive average pooling), so any image of at least 9 x 9 pixels gives 16
features.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyConvAnySize(nn.Module):
    """[B, 3, H, W] (H, W >= 9) -> conv 3->8 k3 s3 -> conv 8->16 k3 s3 -> [B, 16, h, w]
    -> mean over h, w -> [B, 16] -> linear -> {'out': [B, n_outputs]}."""

    def __init__(self, n_outputs: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, stride=3),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, n_outputs)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.fc(torch.flatten(self.conv(x), 1))}
