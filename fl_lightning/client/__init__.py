"""What a ClientApp process runs: Lightning training and validation on the client's data,
several devices (DDP), the federated callbacks, the client's own logs, SecAgg+'s client."""
