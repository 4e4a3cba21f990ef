"""The cascade-lm service: settings, stream I/O, registry, Ray actors, metrics, CLI."""
from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()
