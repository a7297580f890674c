"""A federated MNIST digits classifier: a LightningModule and a LightningDataModule."""
