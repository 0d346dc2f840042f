"""Hub datasets and mixes. The Hub cannot be reached here: a ``save_to_disk`` folder (what
``load_dataset`` hands back, Arrow on disk, with named splits) stands in for a Hub dataset id."""

from __future__ import annotations

import pytest

from dpolab.data import prepare_data
from dpolab.errors import ConfigError, DataError
from dpolab.model import load_tokenizer
from tests.conftest import tiny_config
from tests.data.test_formats import as_format, real_pairs, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-gpt2")


@pytest.fixture(scope="module")
def hub_standin(tmp_path_factory):
    """A Stack-Exchange-like dataset with its own column names and train/test splits."""
    from datasets import Dataset, DatasetDict

    rows = [{"question": p["prompt"], "response_j": p["chosen"], "response_k": p["rejected"], "score": i}
            for i, p in enumerate(real_pairs(40))]
    folder = tmp_path_factory.mktemp("hub") / "org-stack"
    DatasetDict({"train": Dataset.from_list(rows[:30]), "test": Dataset.from_list(rows[30:])}).save_to_disk(folder)
    return str(folder)


COLUMNS = "prompt=question,chosen=response_j,rejected=response_k"


def test_split_and_columns(tmp_path, tokenizer, hub_standin):
    config = dict(dataset=hub_standin, columns=COLUMNS, max_train_pairs=None, max_eval_pairs=None,
                  cache_dir=str(tmp_path))
    _, report, _ = prepare_data(tiny_config(**config), tokenizer)
    assert report.kept == {"train": 30, "eval": 10}  # the dataset's own test split is held out
    assert report.sources[0]["splits"] == {"train": "train", "eval": "test"}
    assert report.sources[0]["format"] == "explicit"
    _, report, _ = prepare_data(tiny_config(**config, split="test", eval_split=None), tokenizer)
    assert report.sources[0]["splits"] == {"all": "test"} and report.kept == {"train": 9, "eval": 1}
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: \['test', 'train'\]\)"):
        prepare_data(tiny_config(**config, eval_split="validation"), tokenizer)


def test_weighted_mix_keeps_the_ratio_and_records_it(tmp_path, tokenizer, hub_standin):
    local = write_jsonl(tmp_path / "local.jsonl", [as_format(p, "conversational") for p in real_pairs(40)])
    # The stand-in has 40 pairs, the file 40: at 0.75 / 0.25 the file limits the total to 40 / 0.75.
    config = tiny_config(dataset=f"{hub_standin}:0.25,{local}:0.75", columns=COLUMNS, max_train_pairs=None,
                         max_eval_pairs=None, cache_dir=str(tmp_path))
    _, report, _ = prepare_data(config, tokenizer)
    stand_in, file = report.to_dict()["sources"]
    assert (stand_in["weight"], file["weight"]) == (0.25, 0.75)
    assert (stand_in["format"], file["format"]) == ("explicit", "conversational")
    used = stand_in["pairs"]["all"], file["pairs"]["all"]
    assert used[1] == 40 and abs(used[0] - 40 / 3) <= 1  # within one pair of 0.25 : 0.75
    assert sum(report.kept.values()) == sum(used)


def test_bad_mix_specs(tokenizer):
    with pytest.raises(ConfigError, match="needs a weight in a mix"):
        prepare_data(tiny_config(dataset="hh-rlhf-sample,other.jsonl:0.5"), tokenizer)
    with pytest.raises(ConfigError, match="must be > 0"):
        prepare_data(tiny_config(dataset="hh-rlhf-sample:0,other.jsonl:0.5"), tokenizer)


@pytest.mark.parametrize(("name", "hub"), [
    ("Anthropic/hh-rlhf", True), ("org/data.v2", True), ("data/pairs.jsonl", False), ("org/pairs.parquet", False),
    ("data/sub/pairs", False), ("./data/pairs", False), ("/abs/pairs", False), ("~/pairs", False)])
def test_only_org_name_is_looked_up_on_the_hub(name, hub):
    """A name that can only be a local path (a data file's name, a deeper path) and does not exist
    is a typo, said at once, not a Hub id whose retries take tens of seconds."""
    from dpolab.data.sources import is_hub_dataset_id, kind

    assert is_hub_dataset_id(name) is hub
    if hub:
        assert kind(name) == "hub"
    else:
        with pytest.raises(DataError, match=f"'{name}': no such file or folder"):
            kind(name)
