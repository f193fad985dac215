"""Training: demo data, point-in-time training set, MLflow logging, registry promotion."""
