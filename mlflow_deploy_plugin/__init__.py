"""Serve, watch and promote MLflow registry models."""

__version__ = "0.1.0"
