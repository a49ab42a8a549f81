"""Data, distributed training/evaluation and tracking around PEP (Ray Data, Ray Train, MLflow)."""
