"""``dpolab push``: upload an export (or a run/sweep, exported on the fly) to the Hugging Face Hub.

One ``create_repo(exist_ok=True)`` and one ``upload_folder`` call, so the repo gets exactly one
commit holding exactly the exported files. Every failure a user can fix becomes a one-line
:class:`PushError`; the endpoint comes from ``HF_ENDPOINT`` read at call time (huggingface_hub
reads it once at import, which is too early for a mirror set later in the process).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab.errors import DpolabError, RunFolderError, first_line
from dpolab.hub.export import export, is_export, list_files
from dpolab.runs import RunFolder, SweepFolder

DEFAULT_ENDPOINT = "https://huggingface.co"
# The Hub's rule for a namespaced repo id: two names of [A-Za-z0-9._-], no leading/trailing '-' or '.',
# no '--' or '..'; dpolab pushes need the namespace (USER/NAME) so the target is never ambiguous.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")


class PushError(DpolabError):
    """A push that cannot go ahead or that the Hub refused; the message says what to do."""


@dataclass
class PushPlan:
    repo_id: str
    folder: Path
    files: list[tuple[str, int]]  # (path in repo, size in bytes), sorted by path
    metadata: dict[str, Any]
    commit_message: str
    private: bool = False
    url: str | None = None  # the commit URL once pushed
    _tmp: Any = field(default=None, repr=False)  # TemporaryDirectory of an on-the-fly export

    def close(self) -> None:
        """Remove the on-the-fly export, if any (an export the user gave is never touched)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise PushError(f"repo id {repo_id!r} is malformed: expected USER/NAME (letters, digits, '-', '_', '.')")


def _commit_message(metadata: dict[str, Any]) -> str:
    """'Upload DPO model RUN (eval loss 0.6543, reward accuracy 0.6875)': says what and how good
    (an SFT export says SFT; a card without a model-index, trained on local data, names no metrics)."""
    name = (metadata.get("model-index") or [{}])[0].get("name") or metadata.get("model_name") or "model"
    stage = "SFT" if "sft" in (metadata.get("tags") or []) else "DPO"
    metrics = {m.get("type"): m.get("value")
               for entry in metadata.get("model-index") or [] for result in entry.get("results", [])
               for m in result.get("metrics", [])}
    parts = [f"{label} {metrics[key]:.4f}" for key, label in
             (("loss", "eval loss"), ("accuracy", "reward accuracy"), ("win_rate", "win rate"))
             if isinstance(metrics.get(key), int | float)]
    return f"Upload {stage} model {name}" + (f" ({', '.join(parts)})" if parts else "") + " with dpolab"


def plan_push(path: str | Path, repo_id: str, private: bool = False) -> PushPlan:
    """Validate everything that can be checked offline and list what would be uploaded."""
    from huggingface_hub import ModelCard

    check_repo_id(repo_id)
    path = Path(path)
    tmp = None
    if is_export(path):
        folder = path
    elif SweepFolder.is_sweep(path) or RunFolder.is_run(path):
        # A run or sweep: export it first, into a temporary folder that lives as long as the plan.
        tmp = tempfile.TemporaryDirectory(prefix="dpolab-push-")
        folder = export(path, Path(tmp.name) / "export", repo_id=repo_id).out_dir
    else:
        raise RunFolderError(f"{path}: not a dpolab export (no config.json, model.safetensors and a dpolab "
                             "model card), run or sweep folder; run `dpolab export` first")
    metadata = ModelCard.load(folder / "README.md").data.to_dict()
    files = [(rel, (folder / rel).stat().st_size) for rel in list_files(folder)]
    return PushPlan(repo_id=repo_id, folder=folder, files=files, metadata=metadata,
                    commit_message=_commit_message(metadata), private=private, _tmp=tmp)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes: upload failures arrive wrapped (RuntimeError from a worker thread
    around the HfHubHTTPError around the transport error)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


# huggingface_hub's HTTP stack (httpx or its fork) raises its own transport errors, not OSError:
# match them by class name rather than importing a client library's internals.
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException", "ConnectionError"}


def _hub_error(exc: Exception, plan: PushPlan) -> PushError:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    where = endpoint()
    chain = _chain(exc)
    if any(type(err).__name__ == "OfflineModeIsEnabled" for err in chain):
        return PushError("HF_HUB_OFFLINE is set: unset it (or HF_HUB_OFFLINE=0) to push to the Hub")
    for err in chain:
        if isinstance(err, HFValidationError):
            return PushError(f"repo id {plan.repo_id!r} is malformed: {first_line(err)}")
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            status = err.response.status_code
            if status == 401:
                return PushError(f"{where} rejected the token (401 Unauthorized): set a valid HF_TOKEN or run "
                                 "`hf auth login` with a token that has write access")
            if status == 403:
                return PushError(f"permission denied (403 Forbidden): your token cannot create or write "
                                 f"{plan.repo_id}; use a write token for the '{plan.repo_id.split('/')[0]}' "
                                 "namespace")
            detail = first_line(getattr(err, "server_message", None) or str(err))
            return PushError(f"{where} refused the upload to {plan.repo_id} (HTTP {status})"
                             + (f": {detail}" if detail else ""))
    if any({cls.__name__ for cls in type(err).__mro__} & _NETWORK_ERRORS for err in chain):
        return PushError(f"network unreachable: cannot connect to {where} (check your connection, proxy "
                         "or HF_ENDPOINT)")
    return PushError(f"push to {plan.repo_id} failed: {first_line(exc, with_type=True)}")


def push(plan: PushPlan, token: str | None = None) -> str:
    """Create the repo if needed and upload the folder in one commit; return the commit URL."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()  # HF_TOKEN first, then the cached `hf auth login` token
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token is needed)")
    api = HfApi(endpoint=endpoint(), token=token)
    try:
        api.create_repo(plan.repo_id, repo_type="model", private=plan.private, exist_ok=True)
        info = api.upload_folder(repo_id=plan.repo_id, folder_path=plan.folder, repo_type="model",
                                 commit_message=plan.commit_message,
                                 commit_description=f"{len(plan.files)} files exported by `dpolab export`.")
    except DpolabError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub/network failure becomes one readable line
        raise _hub_error(exc, plan) from None
    finally:
        plan.close()
    plan.url = str(info.commit_url)
    return plan.url


def format_plan(plan: PushPlan) -> str:
    """The --dry-run report: target, every file with its size, and the card metadata."""
    import yaml

    total = sum(size for _, size in plan.files)
    lines = [f"would push {plan.folder} to {endpoint()}/{plan.repo_id} "
             f"({'private' if plan.private else 'public'}) in one commit: {plan.commit_message!r}",
             f"{len(plan.files)} files, {total:,} bytes:"]
    width = max(len(f"{size:,}") for _, size in plan.files)
    lines += [f"  {size:>{width},}  {rel}" for rel, size in plan.files]
    lines += ["model card metadata:"]
    lines += ["  " + line for line in yaml.safe_dump(plan.metadata, sort_keys=False).splitlines()]
    return "\n".join(lines)
