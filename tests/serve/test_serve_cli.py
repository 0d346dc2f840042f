"""`dpolab serve` as a user starts it: bad input is one line and exit 2 before anything listens."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest


def serve_fails(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run `dpolab serve ARGS`; it must stop with exit 2 and one line, before "listening on"."""
    result = subprocess.run([sys.executable, "-m", "dpolab.cli", "serve", *args], capture_output=True, text=True,
                            cwd=cwd, env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "listening on" not in result.stdout and "Traceback" not in result.stderr, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpolab serve: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "message"), [
    (["nonexist_dir"], "model 'nonexist_dir': no such local folder"),
    (["RUN", "--reference", "nosuchref"], "--reference: model 'nosuchref': no such local folder"),
    (["RUN", "--port", "99999"], "--port must be in 0-65535 (0 picks a free port), got 99999"),
    (["RUN", "--port", "-1"], "--port must be in 0-65535 (0 picks a free port), got -1"),
])
def test_bad_model_reference_or_port_is_one_line_before_listening(run_dir, tmp_path, args, message):
    args = [str(run_dir) if a == "RUN" else a for a in args]
    assert message in serve_fails(*args, "--preferences", "prefs.jsonl", cwd=tmp_path)
    assert not (tmp_path / "prefs.jsonl").exists()


def test_a_port_in_use_is_one_line(run_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = serve_fails(str(run_dir), "--port", str(port), cwd=tmp_path)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line


def test_other_hosts_need_an_api_key(run_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DPOLAB_API_KEY"}
    line = serve_fails(str(run_dir), "--host", "0.0.0.0", "--port", "0", cwd=tmp_path, env=env)
    assert "--host 0.0.0.0 can be reached from other machines: set an API key" in line
    assert "--api-key (or DPOLAB_API_KEY) is empty" in serve_fails(str(run_dir), "--api-key", "", cwd=tmp_path)


def test_api_key_guards_every_request_beyond_localhost(run_dir, tmp_path):
    """`DPOLAB_API_KEY=KEY dpolab serve RUN --host 0.0.0.0`: the openai client with the key gets
    answers, without it 401; the page asks a browser for the key (HTTP Basic), and a browser's
    stored credentials do not let another site's page post."""
    import openai

    from .test_live_server import serve_cli

    key = "s3cret-key"
    env = {**os.environ, "DPOLAB_API_KEY": key}
    with serve_cli(str(run_dir), "--host", "0.0.0.0", "--preferences", "prefs.jsonl", cwd=tmp_path,
                   env=env) as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
        answer = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2,
                                                messages=[{"role": "user", "content": "hi"}])
        assert answer.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert caught.value.code == "invalid_api_key"

        for path in ("/api/model", "/metrics", "/v1/models"):
            status, headers, _ = request(url + path)
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer", path
        status, headers, _ = request(url + "/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert request(url + "/healthz")[0] == 200  # health checks carry no key

        browser = {"Authorization": "Basic " + base64.b64encode(f"me:{key}".encode()).decode()}
        for path in ("/", "/static/app.js", "/api/model", "/experiments"):
            assert request(url + path, headers=browser)[0] == 200, path
        pair = {"prompt": "q", "chosen": "yes", "rejected": "no"}
        status, _, _ = request(url + "/api/preference", pair, headers={**browser, "Origin": url})
        assert status == 201
        status, _, body = request(url + "/api/generate", {"prompt": "hi", "max_new_tokens": 1},
                                  headers={**browser, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
        assert status == 403 and body["error"]["code"] == "cross_origin"
        status, _, _ = request(url + "/api/preference", pair, headers={"Authorization": f"Bearer {key}"})
        assert status == 201
    assert len((tmp_path / "prefs.jsonl").read_text().splitlines()) == 2


def request(url: str, body: dict | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """(status, headers (names in any case), body: JSON errors parsed)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, exc.headers, json.loads(raw) if exc.headers.get_content_type() == "application/json" \
            else raw
