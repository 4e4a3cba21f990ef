"""Plain torch + peft learning: update step, replay, constraints, evaluation, reduction. No Ray, no Redis."""
from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()
