"""The built-in networks: the seed report's MNIST and CIFAR-10 models (Tables I, II) and an MLP."""

from __future__ import annotations

from typing import Any

from torch import nn

from fl_lightning.models.module import ImageClassifier


class MNISTNet(ImageClassifier):
    """Table I: two 5x5 convolutions with max pooling, then 1024-120-84-10 (1x28x28 input)."""

    input_shape = (1, 28, 28)

    def build_network(self) -> nn.Module:
        """Conv(1,32,5) > pool > Conv(32,64,5) > pool > FC 1024-120-84-classes."""
        return nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5),
            self.activation(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5),
            self.activation(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 120),
            self.activation(),
            nn.Linear(120, 84),
            self.activation(),
            nn.Linear(84, self.hparams["num_classes"]),
        )


class CIFAR10Net(ImageClassifier):
    """Table II: three 3x3 conv-BatchNorm-pool blocks, then 4096-512-(dropout 0.5)-256-10."""

    input_shape = (3, 32, 32)

    def build_network(self) -> nn.Module:
        """Conv 64/128/256 with BatchNorm and pooling, then FC 4096-512-256-classes."""

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                self.activation(),
                nn.MaxPool2d(2),
            ]

        return nn.Sequential(
            *block(3, 64),
            *block(64, 128),
            *block(128, 256),
            nn.Flatten(),
            nn.Linear(256 * 4 * 4, 512),
            self.activation(),
            nn.Dropout(0.5),
            nn.Linear(512, 256),
            self.activation(),
            nn.Linear(256, self.hparams["num_classes"]),
        )


class MLP(ImageClassifier):
    """The noisy-clients seed's network: flatten, one hidden layer of 128 ReLU units."""

    def __init__(self, in_features: int = 784, hidden_features: int = 128, **kwargs: Any) -> None:
        self.in_features = in_features
        self.hidden_features = hidden_features
        super().__init__(**kwargs)
        self.save_hyperparameters()

    def build_network(self) -> nn.Module:
        """Flatten > Linear(in, 128) > ReLU > Linear(128, classes)."""
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.in_features, self.hidden_features),
            self.activation(),
            nn.Linear(self.hidden_features, self.hparams["num_classes"]),
        )


MODELS: dict[str, type[ImageClassifier]] = {
    "mnist_net": MNISTNet,
    "cifar10_net": CIFAR10Net,
    "mlp": MLP,
}
