"""fl-lightning: federated learning of PyTorch Lightning image classifiers with Flower."""

__version__ = "0.1.0"
