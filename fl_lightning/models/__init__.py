"""The LightningModules: the built-in image classifier (`module`), its networks
(`networks`), building the run's module (`build`), the Trainer both sides make
(`trainer`) and the floating entries of a state dict (`state_dict`). The built-in classes
are named from here, e.g. `fl_lightning.models.MNISTNet`.
"""

from fl_lightning.models.module import ImageClassifier
from fl_lightning.models.networks import MLP, CIFAR10Net, MNISTNet

__all__ = ["MLP", "CIFAR10Net", "ImageClassifier", "MNISTNet"]
