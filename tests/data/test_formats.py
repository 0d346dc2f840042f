"""Every input format and file type gives the same pairs, and bad input is named or counted."""

from __future__ import annotations

import json

import pytest
import torch

from dpolab.data import Formatter, hh_to_messages, prepare_data, read_jsonl, sample_path, to_pair
from dpolab.errors import DataError
from dpolab.model import build_builtin, load_tokenizer
from dpolab.scoring.collate import PreferenceCollator
from tests.conftest import tiny_config

N_PAIRS = 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-gpt2")


def real_pairs(n: int = N_PAIRS) -> list[dict]:
    """The first ``n`` sample pairs whose dialogues survive a trip through messages unchanged (HH
    rows with odd spacing cannot be written as messages without changing their text)."""
    hh = Formatter("hh")
    out = []
    for row in read_jsonl(sample_path()):
        pair, reason = to_pair(row)
        if reason is not None:
            continue
        messages = hh_to_messages(pair["prompt"])
        answers = [hh.answer(pair[side]) for side in ("chosen", "rejected")]
        if hh.prompt(messages) == pair["prompt"] and answers == [pair["chosen"], pair["rejected"]]:
            out.append({**row, **pair, "messages": messages})
        if len(out) == n:
            return out
    raise AssertionError("not enough round-trippable pairs in the sample")


def as_format(pair: dict, fmt: str) -> dict:
    chosen = {"role": "assistant", "content": pair["chosen"].strip()}
    rejected = {"role": "assistant", "content": pair["rejected"].strip()}
    return {
        "hh": lambda: {"chosen": pair["prompt"] + pair["chosen"], "rejected": pair["prompt"] + pair["rejected"]},
        "explicit": lambda: {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]},
        "conversational": lambda: {"prompt": pair["messages"], "chosen": [chosen], "rejected": [rejected]},
        "implicit": lambda: {"chosen": pair["messages"] + [chosen], "rejected": pair["messages"] + [rejected]},
    }[fmt]()


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ids_of(config, tokenizer):
    datasets, report, _ = prepare_data(config, tokenizer)
    return {split: {col: datasets[split][col][:] for col in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for split in ("train", "eval")}, report, datasets


def test_every_format_and_file_type_gives_the_same_ids_and_logps(tmp_path, tokenizer):
    from datasets import Dataset

    from dpolab.scoring.pairs import score_pairs

    pairs = real_pairs()
    files = {fmt: write_jsonl(tmp_path / f"{fmt}.jsonl", [as_format(p, fmt) for p in pairs])
             for fmt in ("hh", "explicit", "conversational", "implicit")}
    files["explicit.csv"] = str(tmp_path / "explicit.csv")
    Dataset.from_list([as_format(p, "explicit") for p in pairs]).to_csv(files["explicit.csv"], index=False)
    files["conversational.parquet"] = str(tmp_path / "conversational.parquet")
    Dataset.from_list([as_format(p, "conversational") for p in pairs]).to_parquet(files["conversational.parquet"])

    base = dict(max_train_pairs=None, max_eval_pairs=None, cache_dir=str(tmp_path / "cache"))
    expected, report, datasets = ids_of(tiny_config(dataset=files["hh"], **base), tokenizer)
    assert report.kept == {"train": 29, "eval": 3} and report.sources[0]["format"] == "hh"
    model = build_builtin("tiny-gpt2").eval()
    ref = score_pairs(model, datasets["train"], PreferenceCollator(50256), batch_size=8, chunk_size=64)
    for name, path in files.items():
        got, report, datasets = ids_of(tiny_config(dataset=path, **base), tokenizer)
        assert report.sources[0]["format"] == name.split(".")[0]
        assert got == expected, name
        assert report.kept == {"train": 29, "eval": 3}
        again = score_pairs(model, datasets["train"], PreferenceCollator(50256), batch_size=8, chunk_size=64)
        assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1]), name


def test_column_mapping_and_forced_format(tmp_path, tokenizer):
    pairs = real_pairs(12)
    rows = [{"question": p["prompt"], "response_j": p["chosen"], "response_k": p["rejected"]} for p in pairs]
    path = write_jsonl(tmp_path / "se.jsonl", rows)
    base = dict(max_train_pairs=None, max_eval_pairs=None, cache_dir=str(tmp_path / "cache"))
    mapped, report, _ = ids_of(tiny_config(dataset=path, columns="prompt=question,chosen=response_j,"
                                           "rejected=response_k", **base), tokenizer)
    assert report.sources[0]["format"] == "explicit"
    plain, _, _ = ids_of(tiny_config(dataset=write_jsonl(tmp_path / "e.jsonl", [as_format(p, "explicit")
                                                                                 for p in pairs]), **base), tokenizer)
    assert mapped == plain
    with pytest.raises(DataError, match=r"se.jsonl:1: missing key 'prompt'"):
        prepare_data(tiny_config(dataset=path, data_format="explicit", **base), tokenizer)


# ---- bad input: one line naming file, line and field, or a counted drop -------------------------

def test_unknown_layout_lists_the_columns_and_the_formats(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(DataError, match=r"odd.jsonl: unknown layout: columns \['bad', 'good', 'question'\]; "
                                        r"known formats: hh .*explicit .*conversational .*implicit"):
        prepare_data(tiny_config(dataset=path, cache_dir=str(tmp_path)), tokenizer)


def test_bad_role_is_named(tmp_path, tokenizer):
    good = as_format(real_pairs(1)[0], "conversational")
    bad = {**good, "prompt": [{"role": "bot", "content": "hi"}]}
    path = write_jsonl(tmp_path / "roles.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"roles.jsonl:2: field 'prompt': message 0 has role 'bot'"):
        prepare_data(tiny_config(dataset=path, cache_dir=str(tmp_path)), tokenizer)


def test_conversations_not_ending_with_the_assistant_and_mismatches_are_counted(tmp_path, tokenizer):
    pairs = real_pairs(20)
    rows = [as_format(p, "implicit") for p in pairs]
    rows[0] = {**rows[0], "chosen": rows[0]["chosen"][:-1] + [{"role": "user", "content": "and?"}]}
    rows[1] = {**rows[1], "rejected": [{"role": "user", "content": "other"}] + rows[1]["rejected"][1:]}
    rows[2] = {**rows[2], "chosen": rows[2]["chosen"][:-1] + [{"role": "assistant", "content": " "}]}
    path = write_jsonl(tmp_path / "implicit.jsonl", rows)
    _, report, _ = ids_of(tiny_config(dataset=path, max_train_pairs=None, max_eval_pairs=None,
                                      cache_dir=str(tmp_path)), tokenizer)
    assert report.dropped == {"last_not_assistant": 1, "prompt_mismatch": 1, "empty_answer": 1}
    assert sum(report.kept.values()) == 17 and report.to_dict()["dropped"]["prompt_mismatch"] == 1


def test_csv_with_a_missing_column(tmp_path, tokenizer):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen\nhello,hi there\n")
    with pytest.raises(DataError, match=r"pairs.csv: unknown layout: columns \['chosen', 'prompt'\]"):
        prepare_data(tiny_config(dataset=str(path), cache_dir=str(tmp_path)), tokenizer)
    with pytest.raises(DataError, match=r"pairs.csv:2: missing key 'rejected'"):
        prepare_data(tiny_config(dataset=str(path), data_format="explicit", cache_dir=str(tmp_path)), tokenizer)


def test_parquet_that_is_not_parquet(tmp_path, tokenizer):
    path = tmp_path / "pairs.parquet"
    path.write_text('{"chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"pairs.parquet: could not read as parquet \("):
        prepare_data(tiny_config(dataset=str(path), cache_dir=str(tmp_path)), tokenizer)
