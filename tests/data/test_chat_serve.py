"""A run trained on conversational data with a chat-template model, served by ``dpolab serve``: the
server prompts it with the ids training used, scores answers as training does, and captures
preferences in the conversational format that ``dpolab train --dataset`` reads back."""

from __future__ import annotations

import json

import pytest

from dpolab.data import prepare_data
from dpolab.model import load_tokenizer
from tests.chat_model import build_chat_model
from tests.conftest import tiny_config

TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    from dpolab.dpo.trainer import train

    folder = tmp_path_factory.mktemp("chat-run")
    model = build_chat_model(folder / "base")
    rows = [{"prompt": TURNS, "chosen": [{"role": "assistant", "content": f"Knead it {i} times."}],
             "rejected": [{"role": "assistant", "content": "No."}]} for i in range(12)]
    data = folder / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(model=str(model), dataset=str(data), max_steps=2, max_train_pairs=None,
                         max_eval_pairs=None, cache_dir=str(folder / "cache"))
    return train(config, folder / "run"), config


def test_served_chat_uses_the_training_prompt_ids(chat_run, tmp_path):
    from dpolab.serve import create_app
    from dpolab.serve.models import load_served_models

    run, config = chat_run
    tokenizer = load_tokenizer(str(run.model_dir))
    trained = prepare_data(config, tokenizer)[0]["train"][0]["prompt_ids"]
    app = create_app({"TESTING": True, "MODELS": load_served_models(str(run.path)), "WORKERS": 1, "MAX_QUEUE": 2,
                      "MAX_NEW_TOKENS": 8, "DEFAULT_MAX_NEW_TOKENS": 4, "REQUEST_TIMEOUT_S": 60.0,
                      "PREFERENCES_PATH": str(tmp_path / "preferences.jsonl")})
    engine = app.extensions["dpolab.engine"]
    seen = []
    real_generate = engine.generate

    def spy(loaded, prompt_ids, *args, **kwargs):  # the real generation still runs
        seen.append(list(prompt_ids))
        return real_generate(loaded, prompt_ids, *args, **kwargs)

    engine.generate = spy
    try:
        engine.ready.wait(60)
        client = app.test_client()
        response = client.post("/v1/chat/completions", json={"messages": TURNS, "max_tokens": 4})
        assert response.status_code == 200, response.json
        assert seen == [trained] and response.json["usage"]["prompt_tokens"] == len(trained)
        saved = client.post("/api/preference", json={"prompt": TURNS[-1]["content"], "history": TURNS[:-1],
                                                     "chosen": "Knead.", "rejected": "No."})
        assert saved.status_code == 201, saved.json
    finally:
        engine.close()
    row = json.loads((tmp_path / "preferences.jsonl").read_text())
    assert row == {"prompt": TURNS, "chosen": [{"role": "assistant", "content": "Knead."}],
                   "rejected": [{"role": "assistant", "content": "No."}]}
    path = tmp_path / "preferences.jsonl"
    path.write_text(path.read_text() * 4)
    _, report, _ = prepare_data(tiny_config(model=str(run.model_dir), dataset=str(path),
                                            cache_dir=str(tmp_path / "cache")), tokenizer)
    assert report.sources[0]["format"] == "conversational" and sum(report.kept.values()) == 4
