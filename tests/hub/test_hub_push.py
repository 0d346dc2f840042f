"""`dpolab push` against a stand-in Hub.

The Hugging Face Hub cannot be reached from the test machines, so these tests run the real
``huggingface_hub`` client against ``fake_hub.FakeHub``: a local HTTP server on 127.0.0.1 that
implements the Hub endpoints this client version calls (see fake_hub.py). It is the only
stand-in in the suite; everything on our side (export, card, HfApi calls, error mapping) is real.
"""

from __future__ import annotations

import socket

import pytest

from dpolab.cli import main
from dpolab.errors import DpolabError
from dpolab.hub.push import PushError, plan_push, push

REPO = "alice/dpo-tiny"


def exported_bytes(export_dir) -> dict[str, bytes]:
    return {p.relative_to(export_dir).as_posix(): p.read_bytes() for p in export_dir.rglob("*") if p.is_file()}


def test_push_uploads_exactly_the_export_in_one_commit(sweep_export, fake_hub):
    """The server receives exactly the exported files, byte for byte, in one commit."""
    plan = plan_push(sweep_export.out_dir, REPO, private=True)
    url = push(plan)

    repo = fake_hub.repos[REPO]
    assert repo.private is True
    assert len(repo.commits) == 1
    commit = repo.commits[0]
    assert commit.files == exported_bytes(sweep_export.out_dir)
    assert url.endswith(commit.oid)
    assert commit.summary.startswith("Upload DPO model trial-001 (eval loss 0.6543, reward accuracy 0.6875")
    # The weights went through the Hub's LFS upload, as on the real Hub, not inline in the commit.
    assert ("PUT", f"/_lfs/{__import__('hashlib').sha256(commit.files['model.safetensors']).hexdigest()}") \
        in fake_hub.requests
    assert [p for m, p in fake_hub.requests if "/commit/" in p] == [f"/api/models/{REPO}/commit/main"]


def test_pushed_model_loads_by_repo_id(sweep_export, fake_hub, monkeypatch, tmp_path):
    """`from_pretrained("USER/NAME")` loads what was pushed (served back by the same stand-in)."""
    import huggingface_hub.constants as hub_constants
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    push(plan_push(sweep_export.out_dir, REPO))
    # huggingface_hub read HF_ENDPOINT at import, before this test set it: point downloads here too.
    monkeypatch.setattr(hub_constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    model = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=tmp_path / "cache")
    assert any(p.startswith(f"/{REPO}/resolve/") and p.endswith("model.safetensors") for _, p in fake_hub.requests)
    expected = load_file(sweep_export.out_dir / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_push_of_a_run_folder_exports_it_first(hub_run, fake_hub):
    plan = plan_push(hub_run.path, REPO)
    tmp_folder = plan.folder
    push(plan)
    files = fake_hub.repos[REPO].commits[0].files
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(files)
    assert f'model="{REPO}"' in files["README.md"].decode()  # usage snippet names the target repo
    assert not tmp_folder.exists()  # the on-the-fly export is cleaned up


def test_dry_run_lists_files_and_metadata_without_network(sweep_export, fake_hub, capsys):
    rc = main(["push", str(sweep_export.out_dir), "--repo-id", REPO, "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    for rel in sweep_export.files:
        size = (sweep_export.out_dir / rel).stat().st_size
        assert f"{size:,}  {rel}" in out
    assert "- Anthropic/hh-rlhf" in out and "dpolab_base_model: tiny-gpt2" in out and "model-index:" in out
    assert fake_hub.requests == []


@pytest.mark.parametrize(("status", "message"), [
    (401, "rejected the token (401 Unauthorized): set a valid HF_TOKEN"),
    (403, f"permission denied (403 Forbidden): your token cannot create or write {REPO}"),
])
def test_hub_refusals_give_one_line_messages(sweep_export, fake_hub, status, message):
    fake_hub.force_status = status
    with pytest.raises(PushError) as err:
        push(plan_push(sweep_export.out_dir, REPO))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_invalid_token_is_the_401_message(sweep_export, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PushError, match="rejected the token"):
        push(plan_push(sweep_export.out_dir, REPO))
    assert REPO not in fake_hub.repos


def test_connection_refused_is_network_unreachable(sweep_export, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on: bind, read it, close
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_anything")
    with pytest.raises(PushError, match=f"network unreachable: cannot connect to http://127.0.0.1:{port}"):
        push(plan_push(sweep_export.out_dir, REPO))


def test_no_token(sweep_export, fake_hub, monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no cached login
    with pytest.raises(PushError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push(plan_push(sweep_export.out_dir, REPO))
    assert fake_hub.requests == []


@pytest.mark.parametrize("repo_id", ["dpo-tiny", "alice/dpo/tiny", "alice/dpo tiny", "alice/-dpo", "alice/dpo..x",
                                     "/dpo", "alice/", "alice/" + "x" * 97])
def test_malformed_repo_id(sweep_export, repo_id):
    with pytest.raises(PushError, match="is malformed: expected USER/NAME"):
        plan_push(sweep_export.out_dir, repo_id)


@pytest.mark.parametrize("repo_id", ["alice/dpo-tiny", "Org_1/gpt2.dpo-v2", "a/b", "alice/" + "x" * 96])
def test_valid_repo_ids_pass(sweep_export, repo_id):
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)  # the Hub client's own rule takes it, so ours must too
    plan = plan_push(sweep_export.out_dir, repo_id)
    assert plan.repo_id == repo_id and plan.url is None  # planned for exactly this repo, nothing pushed
    assert [name for name, _ in plan.files if name == "model.safetensors"] == ["model.safetensors"]


def test_folder_not_an_export(tmp_path, sweep_export, hub_run):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DpolabError, match="not a dpolab export"):
        plan_push(tmp_path, REPO)
    # A run's raw model/ folder is an HF folder but has no dpolab card: not an export either.
    with pytest.raises(DpolabError, match="not a dpolab export"):
        plan_push(hub_run.model_dir, REPO)


def test_cli_prints_one_line_without_traceback(sweep_export, fake_hub, capsys):
    fake_hub.force_status = 403
    rc = main(["push", str(sweep_export.out_dir), "--repo-id", REPO])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error: permission denied (403 Forbidden)" in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


def test_offline_mode_is_named(sweep_export, fake_hub, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        push(plan_push(sweep_export.out_dir, REPO))
    assert fake_hub.requests == []


def test_export_then_push_through_the_cli(hub_sweep, fake_hub, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(hub_sweep.path), str(out), "--repo-id", REPO]) == 0
    assert main(["push", str(out), "--repo-id", REPO]) == 0
    printed = capsys.readouterr().out
    assert f"pushed {len(fake_hub.repos[REPO].commits[0].files)} files to {REPO}: {fake_hub.url}/{REPO}/commit/" \
        in printed
    assert fake_hub.repos[REPO].commits[0].files == exported_bytes(out)
