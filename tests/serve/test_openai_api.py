"""OpenAI-compatible endpoints: through the Flask test client, then the official
``openai`` client against the live waitress server."""

from __future__ import annotations

import pytest

from .conftest import Gate, sse_events


def test_models_lists_policy_and_reference(client, served):
    body = client.get("/v1/models").json
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [served.policy.id, served.reference.id]


def test_completion(client, served):
    body = client.post("/v1/completions", json={"model": served.policy.id, "prompt": "Once upon a time",
                                                "max_tokens": 4}).json
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 4 and body["usage"]["prompt_tokens"] == 4


def test_completion_with_reference_model(client, served):
    body = client.post("/v1/completions", json={"model": served.reference.id, "prompt": "Hi", "max_tokens": 2}).json
    assert body["model"] == served.reference.id


def test_chat_completion_stream_chunks_end_with_done(client):
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    events = [data for _, data in sse_events([response.get_data(as_text=True)])]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and 1 <= usage["completion_tokens"] <= 5


def test_chat_completion_json_and_stop(make_app):
    app = make_app()
    Gate(app, text=" one two zzz three four")  # a known answer that runs into the stop string
    body = app.test_client().post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "temperature": 0, "stop": ["zzz"]}).json
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "one two"}  # cut before "zzz"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


@pytest.mark.parametrize("path, payload, field, status", [
    ("/v1/completions", {"prompt": "x", "n": 2}, "n", 400),
    ("/v1/completions", {"prompt": ""}, "prompt", 400),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", 400),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature", 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens", 400),
    ("/v1/completions", {"prompt": "x", "top_p": -1}, "top_p", 400),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, "model", 404),
    ("/v1/completions", {"prompt": "word " * 2000, "max_tokens": 8}, "prompt", 400),
    ("/v1/chat/completions", {"messages": []}, "messages", 400),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages", 400),
    ("/v1/chat/completions", {"messages": "hi"}, "messages", 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop", 400),
])
def test_openai_errors_are_openai_shaped(client, path, payload, field, status):
    response = client.post(path, json=payload)
    assert response.status_code == status
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == field


def test_openai_client_against_live_server(live_server, served):
    """The official client (max_retries=0) on 127.0.0.1, served by waitress."""
    import openai

    url = live_server()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [served.policy.id, served.reference.id]

    completion = client.completions.create(model=served.policy.id, prompt="The weather today", max_tokens=4)
    assert isinstance(completion.choices[0].text, str) and 1 <= completion.usage.completion_tokens <= 4

    # Greedy, so the same question gets the same answer: the streamed pieces must add up to it.
    question = {"model": served.policy.id, "messages": [{"role": "user", "content": "Hello, who are you?"}],
                "max_tokens": 6, "temperature": 0}
    whole = client.chat.completions.create(**question)
    stream = client.chat.completions.create(**question, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason] and finish[0] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert text.rstrip() == whole.choices[0].message.content

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=served.policy.id, messages=[{"role": "user", "content": "hi"}], n=2)
    assert caught.value.status_code == 400 and caught.value.param == "n"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)


def test_openai_client_gets_400_not_a_silently_changed_request(live_server, served):
    """Unsupported parameters, max_tokens past the server's cap and a conversation past the context
    used to answer 200 (ignored, capped to 8, oldest turns trimmed): each is now OpenAI's 400
    naming the field; trimming is opt-in and reported."""
    import openai

    url = live_server(MAX_CONTEXT=48, MAX_NEW_TOKENS=8)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60)
    hi = {"model": served.policy.id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refused = [({"response_format": {"type": "json_object"}}, "response_format"),
               ({"tool_choice": "auto"}, "tool_choice"),
               ({"extra_body": {"min_p": 0.1}}, "min_p"),
               ({"extra_body": {"min_p": 0.1, "guided_json": {}}}, "guided_json"),
               ({"max_tokens": 10**9}, "max_tokens")]
    for extra, param in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**{**hi, **extra})
        assert caught.value.status_code == 400 and caught.value.param == param, caught.value
        assert param in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=served.policy.id, prompt="hi", max_tokens=9)
    assert caught.value.param == "max_tokens" and "at most 8" in caught.value.message
    # The no-op values of unsupported features are still fine, and so is the cap itself.
    ok = client.chat.completions.create(**{**hi, "max_tokens": 8}, response_format={"type": "text"},
                                        tool_choice="none", user="me")
    assert ok.choices[0].finish_reason in ("stop", "length")

    history = [{"role": "user", "content": "first question " * 10}, {"role": "assistant", "content": "answer " * 10},
               {"role": "user", "content": "last one"}]
    long = {"model": served.policy.id, "messages": history, "max_tokens": 4}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**long)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    trimmed = client.chat.completions.create(**long, extra_body={"truncate_turns": True})
    assert trimmed.model_extra["truncated_turns"] == 2 and trimmed.usage.prompt_tokens <= 48 - 4
