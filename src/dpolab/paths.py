"""Paths a user types, resolved once at the command-line edge.

Every stage gets absolute paths: what a run records (``config.yaml``, ``run.json``) then means the
same from any working directory, and libraries that resolve relative paths against something
else (Flask against its app root) never see one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def user_path(text: str) -> Path:
    """argparse ``type`` for an argument that is always a local path."""
    return Path(text).expanduser().resolve()


def path_or_name(text: str) -> str:
    """argparse ``type`` for a local path *or* a name (Hub id, built-in model, bundled dataset):
    absolute when it exists here, else unchanged."""
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def resolve_config_paths(values: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig values with their path fields made absolute (``model``/``dataset`` only when
    they are local paths; ``cache_dir`` always)."""
    resolved = dict(values)
    for key in ("model", "ref_model", "dataset"):
        if isinstance(resolved.get(key), str):
            resolved[key] = path_or_name(resolved[key])
    if resolved.get("cache_dir"):
        resolved["cache_dir"] = str(user_path(resolved["cache_dir"]))
    return resolved
