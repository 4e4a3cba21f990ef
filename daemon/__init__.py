"""The cascade-lm service: settings, stream I/O, registry, Ray actors, metrics, CLI.

Only the learner (``daemon.lineage``) and the commands that load a model import torch; the CLI, the
driver and the ingest actor stay light (see ``learners.config``).
"""
