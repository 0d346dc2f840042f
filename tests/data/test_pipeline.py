"""The HH-RLHF pipeline on the real bundled sample and on hand-made bad files."""

import gzip
import json

import pytest

from dpolab.data import prepare_data, read_jsonl, to_pair, truncate_pair
from dpolab.errors import DataError
from dpolab.model import load_tokenizer
from tests.conftest import tiny_config

GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: hi\n\nAssistant: Go away."}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-gpt2")


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_split_at_the_last_assistant_turn():
    dialogue = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    pair, _ = to_pair({"chosen": dialogue, "rejected": dialogue + "!"})
    assert (pair["prompt"], pair["chosen"]) == ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", " d")
    pair, reason = to_pair(GOOD)
    assert reason is None
    assert pair == {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello! How can I help?",
                    "rejected": " Go away."}


@pytest.mark.parametrize(("row", "reason"), [
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "prompt_mismatch"),
    ({"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: y"}, "empty_answer"),
    ({"chosen": "\n\nHuman: a\n\nAssistant:  ", "rejected": "\n\nHuman: a\n\nAssistant: y"}, "empty_answer"),
    ({"chosen": "no turns here", "rejected": "\n\nHuman: a\n\nAssistant: y"}, "no_assistant_turn"),
])
def test_unusable_pairs_are_dropped_with_a_reason(row, reason):
    assert to_pair(row) == (None, reason)


def test_bundled_sample_real_quirks_are_counted(tokenizer):
    datasets, report, _ = prepare_data(tiny_config(max_train_pairs=None, max_eval_pairs=None), tokenizer)
    assert report.rows_read == 2312
    assert report.dropped == {"prompt_mismatch": 5, "empty_answer": 4}
    assert report.kept["train"] + report.kept["eval"] == 2312 - 9
    assert report.kept["eval"] == round(2303 * 0.1)
    example = datasets["train"][0]
    assert example["prompt"].endswith("\n\nAssistant:")
    assert example["chosen_ids"][-1] == tokenizer.eos_token_id == example["rejected_ids"][-1]
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(
        datasets["train"]["prompt_ids"], datasets["train"]["chosen_ids"], datasets["train"]["rejected_ids"],
        strict=True)]
    assert max(lengths) <= 512 and lengths == datasets["train"]["length"]
    assert report.truncated["prompt"] > 0  # the sample has dialogues longer than 512 tokens


def test_split_is_deterministic_and_seeded(tokenizer):
    first, _, _ = prepare_data(tiny_config(seed=1), tokenizer)
    again, _, _ = prepare_data(tiny_config(seed=1), tokenizer)
    other, _, _ = prepare_data(tiny_config(seed=2), tokenizer)
    assert first["eval"]["prompt"] == again["eval"]["prompt"]
    assert first["eval"]["prompt"] != other["eval"]["prompt"]
    assert not set(first["eval"]["prompt"]) & set(first["train"]["prompt"]) - {""}


def test_truncation_keeps_the_latest_prompt_tokens_then_cuts_answers():
    prompt, chosen, rejected = list(range(100)), list(range(1000, 1030)), list(range(2000, 2050))
    p, c, r, prompt_cut, answer_cut = truncate_pair(prompt, chosen, rejected, max_length=120, max_prompt_length=60)
    assert p == list(range(30, 100))  # oldest 30 tokens gone: 70 + 50 = 120
    assert (c, r) == (chosen, rejected) and prompt_cut and not answer_cut
    p, c, r, prompt_cut, answer_cut = truncate_pair(prompt, chosen, rejected, max_length=80, max_prompt_length=60)
    assert p == list(range(40, 100))  # never below max_prompt_length...
    assert c == chosen[:20] and r == rejected[:20]  # ...then answers are cut at the end
    assert prompt_cut and answer_cut
    assert truncate_pair([1, 2], [3], [4], 10, 5) == ([1, 2], [3], [4], False, False)


def test_local_jsonl_file_and_release_folder(tmp_path, tokenizer):
    rows = [json.dumps(GOOD)] * 20
    folder = tmp_path / "harmless-base"
    folder.mkdir()
    with gzip.open(folder / "train.jsonl.gz", "wt") as handle:
        handle.write("\n".join(rows) + "\n")
    write_lines(folder / "test.jsonl", rows[:5])
    datasets, report, _ = prepare_data(tiny_config(dataset=str(folder), max_train_pairs=None,
                                                   max_eval_pairs=None), tokenizer)
    assert report.kept == {"train": 20, "eval": 5}  # the release's own split is kept
    assert len(report.files) == 2


# ---- bad input: one clear line naming file and line, or a counted drop -----------------------

@pytest.mark.parametrize(("lines", "message"), [
    ([json.dumps(GOOD), "{not json"], r"bad.jsonl:2: invalid JSON"),
    ([json.dumps(GOOD), json.dumps({"chosen": GOOD["chosen"]})], r"bad.jsonl:2: missing key 'rejected'"),
    ([json.dumps({"chosen": 3, "rejected": "x"})], r"bad.jsonl:1: field 'chosen' must be a string, got int"),
    (["[1, 2]"], r"bad.jsonl:1: expected a JSON object, got list"),
])
def test_malformed_rows_fail_with_file_and_line(tmp_path, tokenizer, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        prepare_data(tiny_config(dataset=path, cache_dir=str(tmp_path)), tokenizer)


def test_non_utf8_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"chosen": "\xff\xfe", "rejected": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_skip_bad_rows_counts_them(tmp_path, tokenizer):
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps(GOOD)] * 30 + ["{oops", json.dumps({"chosen": "x"})])
    _, report, _ = prepare_data(tiny_config(dataset=path, skip_bad_rows=True), tokenizer)
    assert report.dropped["bad_row"] == 2
    assert report.rows_read == 32 and sum(report.kept.values()) == 30


def test_truncated_gzip_is_an_error(tmp_path, tokenizer):
    payload = gzip.compress(("\n".join([json.dumps(GOOD)] * 200) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: corrupt or truncated gzip stream after line"):
        prepare_data(tiny_config(dataset=str(path)), tokenizer)


def test_empty_file_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: empty file"):
        prepare_data(tiny_config(dataset=str(path)), tokenizer)


def test_file_of_only_mismatched_prompts_says_nothing_is_left(tmp_path, tokenizer):
    row = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    path = write_lines(tmp_path / "mismatch.jsonl", [json.dumps(row)] * 4)
    with pytest.raises(DataError, match=r"no usable pairs left .*prompt_mismatch=4"):
        prepare_data(tiny_config(dataset=path), tokenizer)


def test_unknown_dataset_name_is_explained(tokenizer):
    with pytest.raises(DataError, match="is not 'hh-rlhf-sample', an existing file/folder, or a Hub id"):
        prepare_data(tiny_config(dataset="hh-rlhf-smaple"), tokenizer)


def test_tokenized_data_is_cached_by_content(tmp_path, tokenizer, caplog):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD)] * 10)
    config = tiny_config(dataset=path)
    _, _, key = prepare_data(config, tokenizer)
    with caplog.at_level("INFO", logger="dpolab.data.pipeline"):
        _, _, again = prepare_data(config, tokenizer)
    assert again == key and "cache hit" in caplog.text
    write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD)] * 11)  # edited file: new key
    assert prepare_data(config, tokenizer)[2] != key


def test_answer_lengths_leave_out_the_appended_eos(tmp_path, tokenizer):
    """Token lengths are the answer's tokens as trained without the EOS the pipeline appends, also
    when the answer was cut (and its EOS with it); characters are the answer text's."""
    long_answer = " word" * 200
    rows = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello there!", "rejected": long_answer}] * 4
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(r) for r in rows])
    datasets, report, _ = prepare_data(tiny_config(dataset=path, max_length=64, max_prompt_length=32,
                                                   cache_dir=str(tmp_path)), tokenizer)
    assert report.truncated["answer"] == 4
    row = datasets["train"][0]
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id
    assert row["chosen_tokens"] == 3  # " Hello", " there", "!"
    assert row["rejected_tokens"] == 64 - len(row["prompt_ids"]) == len(row["rejected_ids"])  # cut: no EOS left
    assert (row["chosen_chars"], row["rejected_chars"]) == (len("Hello there!"), len(long_answer.strip()))
