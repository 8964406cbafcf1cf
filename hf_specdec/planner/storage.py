"""Where the planner keeps calibrations and acceptance statistics, and how it names models."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """`$HF_SPECDEC_CACHE/planner`, else `~/.cache/hf_specdec/planner`."""
    root = os.environ.get("HF_SPECDEC_CACHE")
    return Path(root) / "planner" if root else Path.home() / ".cache" / "hf_specdec" / "planner"


def slug(text: str) -> str:
    """A file-name-safe version of a device or model name."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_") or "unnamed"


def weights_fingerprint(model, with_name: bool = True) -> str:
    """A short hash of a model's identity (`with_name`: the path or id it was loaded from) and a few of its weights:
    two checkpoints of one config differ here."""
    import torch

    digest = hashlib.sha1(str(getattr(model.config, "_name_or_path", "") if with_name else "").encode())
    params = list(model.parameters())
    for tensor in (params[0], params[-1]):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a tensor-parallel shard: this rank's
        sample = local.detach().flatten()[:256].to("cpu", torch.float32)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:12]
