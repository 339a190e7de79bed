"""Engines run deployments: ``local`` (supervised processes on this machine)."""
