"""Differential privacy, whichever side uses it: DP-SGD (Opacus), the accountant state a
client keeps, the server's ledger of epsilons, DP-FedAvg's noised release, and where DP
randomness comes from."""
