"""The reference model of the mission: conv(3->32)-pool-conv(32->64)-pool-fc(4096->128), head fc(128->C)."""

from torch import nn


class ConvNetBackbone(nn.Sequential):
    """Everything up to the 128-d features; the last linear layer is the head (see ClassifierModule)."""

    out_features = 128
    input_size = 32  # the fc layer's 64*8*8 inputs fix it; transferlab.config.validation checks the data against it

    def __init__(self, image_size: int = 32):
        if image_size != self.input_size:
            raise ValueError(f"The ConvNet takes 32x32 images (fc 64*8*8); got image_size={image_size}.")
        super().__init__(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
            nn.ReLU(),
        )
