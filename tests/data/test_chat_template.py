"""Chat-template models: prompts rendered by ``apply_chat_template`` (generation prompt on), answers
ending with the end-of-turn token, and ``dpolab serve`` building the same prompt ids."""

from __future__ import annotations

import json

import pytest

from dpolab.data import Formatter, prepare_data, resolve_formatter
from dpolab.errors import ConfigError
from dpolab.model import load_tokenizer
from tests.chat_model import build_chat_model
from tests.conftest import tiny_config
from tests.data.test_formats import as_format, real_pairs, write_jsonl


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat-model"))


def test_conversations_are_rendered_with_the_chat_template(tmp_path, chat_model):
    tokenizer = load_tokenizer(str(chat_model))
    pairs = real_pairs(12)
    path = write_jsonl(tmp_path / "conv.jsonl", [as_format(p, "conversational") for p in pairs])
    datasets, report, _ = prepare_data(tiny_config(model=str(chat_model), dataset=path, max_train_pairs=None,
                                                   max_eval_pairs=None, cache_dir=str(tmp_path)), tokenizer)
    assert report.chat_template == "tokenizer"
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    by_prompt = {tuple(p["prompt_ids"]): p for p in datasets["train"]}
    for pair in pairs:
        expected = tokenizer.apply_chat_template(pair["messages"], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        if tuple(expected) not in by_prompt:
            continue  # held out
        row = by_prompt.pop(tuple(expected))
        assert row["chosen_ids"][-1] == end_of_turn == row["rejected_ids"][-1]
        assert tokenizer.decode(row["chosen_ids"]) == pair["chosen"].strip() + "<|im_end|>"
        # Nothing is appended to a templated answer: its length counts every token, end of turn included.
        assert row["chosen_tokens"] == len(row["chosen_ids"]) and row["rejected_tokens"] == len(row["rejected_ids"])
        assert row["chosen_chars"] == len(pair["chosen"].strip())
    assert not by_prompt and report.kept["train"] == 11


def test_hh_rows_become_messages_under_a_chat_template(tmp_path, chat_model):
    tokenizer = load_tokenizer(str(chat_model))
    pairs = real_pairs(12)
    hh = write_jsonl(tmp_path / "hh.jsonl", [as_format(p, "hh") for p in pairs])
    conv = write_jsonl(tmp_path / "conv.jsonl", [as_format(p, "conversational") for p in pairs])
    config = dict(model=str(chat_model), max_train_pairs=None, max_eval_pairs=None, cache_dir=str(tmp_path))
    a, _, _ = prepare_data(tiny_config(dataset=hh, **config), tokenizer)
    b, _, _ = prepare_data(tiny_config(dataset=conv, **config), tokenizer)
    assert a["train"]["prompt_ids"][:] == b["train"]["prompt_ids"][:]
    forced, report, _ = prepare_data(tiny_config(dataset=conv, chat_template="hh", **config), tokenizer)
    assert report.chat_template == "hh" and forced["train"][0]["prompt"].endswith("\n\nAssistant:")


def test_template_setting(tmp_path, chat_model):
    gpt2 = load_tokenizer("tiny-gpt2")
    assert resolve_formatter(gpt2) == Formatter("hh")
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        resolve_formatter(gpt2, "tokenizer")
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")
    formatter = resolve_formatter(gpt2, str(jinja))
    assert formatter.prompt([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant] "
    with pytest.raises(ConfigError, match="is not 'auto', 'hh', 'tokenizer' or an existing .jinja file"):
        resolve_formatter(gpt2, "missing.jinja")


def test_serve_builds_the_training_prompt_ids(tmp_path, chat_model):
    """The web app's chat and /v1/chat/completions render with the training formatter."""
    from dpolab.serve.chat import fit_turns, formatter_for

    tokenizer = load_tokenizer(str(chat_model))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How do I bake bread?"}]
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": messages, "chosen": [{"role": "assistant", "content": "Knead."}],
                                                 "rejected": [{"role": "assistant", "content": "No."}]}] * 4)
    datasets, _, _ = prepare_data(tiny_config(model=str(chat_model), dataset=path, cache_dir=str(tmp_path)),
                                  tokenizer)
    trained = datasets["train"][0]["prompt_ids"]
    prompt, n_tokens, dropped = fit_turns(messages, lambda t: len(tokenizer(t).input_ids), 500, "messages",
                                          formatter_for(tokenizer))
    assert tokenizer(prompt).input_ids == trained and n_tokens == len(trained) and dropped == 0
    assert json.dumps(trained)  # plain ints


def test_preference_capture_writes_rows_training_reads_back(tmp_path, chat_model):
    from dpolab.serve.chat import HH, formatter_for
    from dpolab.serve.preferences import append_row, preference_row

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Help me"}]
    chat_tokenizer = load_tokenizer(str(chat_model))
    for formatter, model, fmt in ((formatter_for(chat_tokenizer), str(chat_model), "conversational"),
                                  (HH, "tiny-gpt2", "hh")):
        path = tmp_path / f"{fmt}.jsonl"
        for i in range(4):
            append_row(path, preference_row(turns, f"Sure {i}.", "No.", formatter))
        datasets, report, _ = prepare_data(tiny_config(model=model, dataset=str(path), cache_dir=str(tmp_path)),
                                           load_tokenizer(model))
        assert report.sources[0]["format"] == fmt and sum(report.kept.values()) == 4 and not report.dropped
