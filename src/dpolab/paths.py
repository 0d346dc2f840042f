"""Paths a user types, resolved once at the command-line edge.

Every stage gets absolute paths: what a run records (``config.yaml``, ``run.json``) then means the
same from any working directory, and libraries that resolve relative paths against something
else (Flask against its app root) never see one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# chat_template settings that are names, not files (see dpolab.data.templates.resolve_formatter).
TEMPLATE_SETTINGS = ("auto", "hh", "tokenizer")


def user_path(text: str) -> Path:
    """argparse ``type`` for an argument that is always a local path."""
    return Path(text).expanduser().resolve()


def path_or_name(text: str) -> str:
    """argparse ``type`` for a local path *or* a name (Hub id, built-in model, bundled dataset):
    absolute when it exists here, else unchanged."""
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def dataset_path_or_name(text: str) -> str:
    """:func:`path_or_name` for a dataset, each member of a weighted mix included
    (``data/a.jsonl:0.7,org/other:0.3`` -> ``/abs/data/a.jsonl:0.7,org/other:0.3``). A member that
    is neither an existing path nor a Hub id (a mistyped file) fails here, before anything loads."""
    from dpolab.data.sources import kind, parse_mix

    specs = parse_mix(text)
    names = [path_or_name(spec.name) for spec in specs]
    for name in names:
        kind(name)
    if len(specs) == 1 and specs[0].name == text.strip():  # one source, no weight
        return names[0]
    return ",".join(f"{name}:{spec.weight}" for name, spec in zip(names, specs, strict=True))


def resolve_config_paths(values: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig values with their path fields made absolute (``model``, ``dataset`` (mix members
    too) and ``chat_template`` only when they are local paths; ``cache_dir`` always)."""
    resolved = dict(values)
    for key in ("model", "ref_model"):
        if isinstance(resolved.get(key), str):
            resolved[key] = path_or_name(resolved[key])
    if resolved.get("chat_template") not in (None, *TEMPLATE_SETTINGS):  # a .jinja file
        resolved["chat_template"] = path_or_name(resolved["chat_template"])
    if isinstance(resolved.get("dataset"), str):
        resolved["dataset"] = dataset_path_or_name(resolved["dataset"])
    if resolved.get("cache_dir"):
        resolved["cache_dir"] = str(user_path(resolved["cache_dir"]))
    return resolved
