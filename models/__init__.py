"""Anomaly models: frozen encoders, necks, decoders; one registry by name."""
from .registry import create_model, list_models, register_model  # noqa: F401
