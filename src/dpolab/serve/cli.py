"""`dpolab serve`: argparse wiring. The CLI imports this module at start, so it imports nothing
heavy; models load when the command runs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from dpolab.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "DPOLAB_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="web app + JSON and OpenAI-compatible APIs for a trained model",
        description="Chat with a DPO model, compare it with its reference (implicit rewards), and save "
                    "preference pairs for the next round. Also serves /api/* and /v1/* (OpenAI).")
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="run or sweep folder (its best model), export folder, built-in name or Hub id; "
                             "default: the most recent finished run or sweep under --runs-dir")
    parser.add_argument("--reference", metavar="BASE", default=None,
                        help="reference model for compare mode and rewards (default: the run's base model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1); any other needs an API key")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--api-key", metavar="KEY", default=None,
                        help=f"every request but /healthz must send 'Authorization: Bearer KEY' (a browser: any "
                             f"user name, KEY as password); default: ${API_KEY_ENV}, which keeps KEY out of `ps`")
    parser.add_argument("--runs-dir", default="runs", help="where to look for the default MODEL (default runs)")
    parser.add_argument("--workers", type=int, default=8,
                        help="generations running at once, sharing each decode step (default 8)")
    parser.add_argument("--queue", type=int, default=8, help="generations that may wait before 429 (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="cap on new tokens per answer (default 512)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request time limit in s (default 120)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                        help="weights for generation (default fp32); int8 decodes ~2x faster on a CPU "
                        "(BENCHMARKS.md)")
    parser.add_argument("--preferences", default="preferences.jsonl",
                        help="JSONL file that marked preferences are appended to (default preferences.jsonl)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from dpolab.errors import DpolabError
    from dpolab.serve import create_app
    from dpolab.serve.models import default_source
    from dpolab.serve.server import ServerThread

    for name, low in (("workers", 1), ("queue", 0), ("max_new_tokens", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:  # the OS would take 99999 modulo 65536, or a random port
        raise ConfigError(f"--port must be in 0-65535 (0 picks a free port), got {args.port}")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0, got {args.timeout}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise ConfigError(f"--api-key (or {API_KEY_ENV}) is empty")
    if api_key is None and args.host not in LOOPBACK:
        raise ConfigError(f"--host {args.host} can be reached from other machines: set an API key with "
                          f"{API_KEY_ENV}=KEY (or --api-key KEY); clients then send 'Authorization: Bearer KEY'")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every path the user typed is made absolute here, once: the app must not resolve a relative
    # path against anything else (Flask's send_from_directory resolves against the package root).
    source = local_or_hub(args.model) if args.model else default_source(Path(args.runs_dir).resolve())
    reference = local_or_hub(args.reference) if args.reference else None
    preferences = Path(args.preferences).resolve()
    check_models(source, reference)  # in one line, before anything listens or loads
    app = create_app({"MODEL": source, "REFERENCE": reference, "PRECISION": args.precision,
                      "WORKERS": args.workers,
                      "MAX_QUEUE": args.queue, "MAX_NEW_TOKENS": args.max_new_tokens,
                      "REQUEST_TIMEOUT_S": args.timeout, "PREFERENCES_PATH": str(preferences),
                      # A page on another site whose name it re-points at 127.0.0.1 (DNS rebinding)
                      # sends its own name as Host: a server on this machine only answers its own names.
                      "TRUSTED_HOSTS": list(LOOPBACK) if args.host in LOOPBACK else None,
                      "API_KEY": api_key, "LOAD_AT_CREATE": False})  # loading starts once the port is ours
    engine = app.extensions["dpolab.engine"]
    # A service manager stops us with SIGTERM: shut down as cleanly as on Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        server = ServerThread(app, args.host, args.port)
    except OSError as exc:  # port in use, no permission for a port below 1024, unknown host
        raise ConfigError(f"--host/--port: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    engine.start(background=True)  # the server listens while the models load: /healthz answers 503
    with server as url:
        print(f"dpolab serve: listening on {url} (waitress); loading {source} ...", flush=True)
        try:
            while not engine.ready.wait(0.5):
                if engine.load_error:
                    raise DpolabError(f"could not load the models: {engine.load_error}")
            models = engine.models
            reference = models.reference.id if models.reference else "none (compare mode off: pass --reference)"
            print(f"dpolab serve: model {models.policy.id}, reference {reference}\n"
                  f"  page         {url}/\n"
                  f"  OpenAI API   {url}/v1  (model {models.policy.id!r})\n"
                  f"  preferences  -> {preferences}\nCtrl-C to stop.", flush=True)
            while server.running():
                server.join(1.0)
        except KeyboardInterrupt:
            pass
    return 0


def check_models(source: str, reference: str | None) -> None:
    """Fail in one line for a model or reference that cannot load: a folder that is no run, sweep
    or model folder, a name that is neither a folder, a built-in nor a Hub model."""
    from dpolab.model import check_source
    from dpolab.serve.models import describe

    info, _, _ = describe(source)
    if info["kind"] == "hub":
        check_source(source)
    try:
        if reference or info.get("base_model"):
            check_source(reference or info["base_model"])
    except ConfigError as exc:
        raise ConfigError(f"--reference: {exc}" if reference else f"the model's base model (its reference): {exc}")\
            from None


def local_or_hub(name: str) -> str:
    """An existing local folder as an absolute path; anything else (a Hub id, a built-in name) as given."""
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
