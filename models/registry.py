"""One registry of anomaly models by name (timm style).

Every CLI and exporter only calls `create_model(name, **cfg)` / `models.checkpoint.load_checkpoint`,
so a new model needs no edits outside `models/`.
"""
from __future__ import annotations

from typing import Callable, Dict

_REGISTRY: Dict[str, Callable] = {}


def register_model(name: str):
    """Decorator: register a model class (a `models.base.AnomalyModel` subclass) under `name`."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.model_name = name
        return cls

    return deco


def _ensure_builtin_models():
    # Importing the model families registers them.
    from . import zoo  # noqa: F401


def list_models():
    _ensure_builtin_models()
    return sorted(_REGISTRY)


def get_model_class(name: str):
    _ensure_builtin_models()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, pretrained: bool = True, **cfg):
    """Build model `name` from config keyword arguments (unknown keys are an error).

    `pretrained=False` skips loading encoder weights (used when a checkpoint supplies them).
    """
    cls = get_model_class(name)
    config = cls.config_class.from_dict(cfg)
    return cls(config, pretrained=pretrained)


def saved_config(name: str, config: Dict) -> Dict:
    """A config saved by an earlier version (checkpoint, training state), completed so it builds the
    model that was saved: a field it lacks takes the config class's `PREDATING` value for it (where a
    field came in with a default other than the old behaviour), else the field's default."""
    cls = get_model_class(name).config_class
    return {**cls().to_dict(), **getattr(cls, "PREDATING", {}), **config}
