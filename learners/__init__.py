"""Plain torch + peft learning: update step, replay, constraints, evaluation, reduction. No Ray, no Redis.

``learners.config`` is plain data (no torch), so processes that only read settings stay light; the
modules that import transformers or peft run :func:`learners._compat.ensure_torchvision_importable`
first.
"""
