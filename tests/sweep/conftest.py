"""Sweep fixtures: trials of a few optimizer steps on the built-in tiny GPT-2 and the bundled sample,
each sweep with its own cache folder so "the reference pass ran once" is provable from its records."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml


def tiny_base(cache_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Sweep ``base``: 2 optimizer steps on 16 pairs, 8 held out, short sequences."""
    values = dict(model="tiny-gpt2", dataset="hh-rlhf-sample", max_train_pairs=16, max_eval_pairs=8,
                  max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8, logging_steps=1,
                  eval_steps=2, max_length=128, max_prompt_length=64, seed=0, cache_dir=str(cache_dir))
    values.update(overrides)
    return values


def write_sweep_yaml(path: Path, **values: Any) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def dpolab_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dpolab.cli", *args]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


# -- PostgreSQL: a throwaway server on 127.0.0.1 -----------------------------------------------

def _postgres_bin() -> Path | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").is_file() and (root / "pg_ctl").is_file():
            return root
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").exists() else None


def _unavailable(reason: str):
    # CI installs PostgreSQL (.ci/run): there, a missing server is a broken setup, not a skip.
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL test cannot run in CI: {reason}")
    pytest.skip(f"PostgreSQL not available: {reason} (apt-get install -y postgresql; pip install psycopg2-binary)")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def postgres_url():
    """Start PostgreSQL from the Debian packages in a temporary cluster; yield its SQLAlchemy URL; stop it."""
    import tempfile

    bin_dir = _postgres_bin()
    if bin_dir is None:
        _unavailable("no initdb/pg_ctl found")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("the psycopg2 driver is not installed")
    # The server refuses to run as root: run it as the 'postgres' system user the package creates.
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            _unavailable("running as root and runuser is missing")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="dpolab-pg-"))
    data = root / "data"
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "dpolab", "--auth=trust",
                        "--no-sync"], check=True, capture_output=True, env=env, timeout=120)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w",
                        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, env=env, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        stderr = getattr(exc, "stderr", b"") or b""
        pytest.fail(f"PostgreSQL did not start: {exc}\n{stderr.decode(errors='replace')}\n{log}")
    try:
        yield f"postgresql+psycopg2://dpolab@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, env=env, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
