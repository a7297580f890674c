"""Datasets and their split into clients: decoding (`datasets`), augmentation, partitions,
the built-in DataModule and the loaders a client or the server uses (`loaders`)."""
