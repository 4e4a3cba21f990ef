"""Environment guards that must run before transformers (and so torchvision) is imported.

The project's own ``.venv`` holds no torchvision, so there this only sets the offline defaults. The
Avalanche baselines' ``.venv-avalanche`` does: avalanche-lib pins a torchvision whose PyPI build is
compiled for CUDA; beside the CPU torch its C++ extension cannot load, and its Python side then dies
registering fake kernels for ``torchvision::nms`` ("operator torchvision::nms does not exist").
transformers imports torchvision whenever it is installed, so without this guard ``import peft``
fails there. We never use torchvision's operators; declaring the two schemas lets the import complete. Every module that imports
transformers or peft calls it first (``learners.update``, ``learners.reduction``, ``daemon.lineage``
and the commands that load a model); processes that never load a model never import torch.
"""
from __future__ import annotations

import os

_done = False


def ensure_torchvision_importable() -> None:
    global _done
    if _done:
        return
    _done = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    import torch

    spec = importlib.util.find_spec("torchvision")
    ext = os.path.join(os.path.dirname(spec.origin), "_C.so") if spec and spec.origin else ""
    try:
        torch.ops.load_library(ext)  # the real extension, where it matches this torch
        return
    except Exception:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the library object alive for the life of the process.
    globals()["_torchvision_lib"] = lib
