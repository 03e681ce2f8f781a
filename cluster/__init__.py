"""Cluster operations: job submission, scheduled retrains, the MLflow tracking server."""
