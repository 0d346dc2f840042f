"""HH-RLHF preference data: load, split into prompt / chosen / rejected, tokenize, truncate, cache.

An HH-RLHF row is two full dialogues that share everything up to the last assistant turn:

    {"chosen":   "\\n\\nHuman: hi\\n\\nAssistant: Hello! How can I help?",
     "rejected": "\\n\\nHuman: hi\\n\\nAssistant: Go away."}

We split each at its LAST ``\\n\\nAssistant:``: the prompt keeps that marker, the answer is what
follows. The prompt must be identical for both answers, so rows whose dialogues differ before the
last assistant turn, and rows with an empty answer, are dropped and counted (never silently).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_from_disk

from dpolab.config import TrainConfig
from dpolab.errors import DataError
from dpolab.hh import ASSISTANT, HUB_ID, SAMPLE_NAME

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when tokenization or truncation rules change


def sample_path() -> Path:
    """The bundled real sample: HH-RLHF harmless-base test split, 2,312 rows (MIT, see LICENSE beside it)."""
    return Path(str(resources.files("dpolab") / "resources" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("DPOLAB_CACHE", Path.home() / ".cache" / "dpolab"))


@dataclass
class DataReport:
    """What the pipeline read, kept and dropped. Saved with every run as ``data_report.json``."""

    source: str
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    max_length: int = 0
    max_prompt_length: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files": self.files,
            "rows_read": self.rows_read,
            "kept": dict(self.kept),
            "dropped": dict(sorted(self.dropped.items())),
            "truncated": {"prompt": self.truncated["prompt"], "answer": self.truncated["answer"]},
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
        }

    def summary_line(self) -> str:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        kept = ", ".join(f"{k}={v}" for k, v in self.kept.items())
        return (f"data: read {self.rows_read} rows from {self.source}; kept {kept}; dropped {dropped}; "
                f"truncated prompts={self.truncated['prompt']} answers={self.truncated['answer']}")


# ---------------------------------------------------------------------------------------------
# Reading raw rows
# ---------------------------------------------------------------------------------------------

def read_jsonl(path: Path, report: DataReport, skip_bad_rows: bool = False) -> list[dict[str, str]]:
    """Rows ``{"chosen", "rejected"}`` of one ``.jsonl`` / ``.jsonl.gz`` file.

    Malformed input raises :class:`DataError` naming file and line, or with ``skip_bad_rows`` is
    counted under ``dropped["bad_row"]``. A truncated gzip stream is always an error: the rows
    after the cut are lost and no count could say how many.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[dict[str, str]] = []
    line_no = 0

    def bad(message: str) -> None:
        if not skip_bad_rows:
            raise DataError(f"{path}:{line_no}: {message}")
        report.dropped["bad_row"] += 1
        logger.warning("%s:%d: skipped bad row: %s", path, line_no, message)

    try:
        with opener(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):  # noqa: B007 (used by bad())
                if not raw.strip():
                    continue
                report.rows_read += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad(f"not valid UTF-8 (byte {exc.start})")
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    bad(f"invalid JSON ({exc.msg} at column {exc.colno})")
                    continue
                if not isinstance(row, dict):
                    bad(f"expected a JSON object, got {type(row).__name__}")
                    continue
                problem = next((f"missing key {k!r}" for k in ("chosen", "rejected") if k not in row), None)
                problem = problem or next(
                    (f"field {k!r} must be a string, got {type(row[k]).__name__}"
                     for k in ("chosen", "rejected") if not isinstance(row[k], str)), None)
                if problem:
                    bad(problem)
                    continue
                rows.append({"chosen": row["chosen"], "rejected": row["rejected"]})
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip stream after line {line_no} ({exc})") from None
    if line_no == 0:
        raise DataError(f"{path}: empty file (no rows)")
    return rows


def _local_files(source: Path) -> dict[str, list[Path]]:
    """Files of a local source, by split. A folder holding ``train*`` and ``test*`` files keeps the
    release's own split; anything else is one split that we divide ourselves."""
    if source.is_file():
        return {"all": [source]}
    files = sorted(p for p in source.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise DataError(f"{source}: no *.jsonl or *.jsonl.gz files found")
    train = [p for p in files if p.name.startswith("train")]
    test = [p for p in files if p.name.startswith("test")]
    if train and test and len(train) + len(test) == len(files):
        return {"train": train, "eval": test}
    return {"all": files}


def load_raw(config: TrainConfig, report: DataReport) -> dict[str, list[dict[str, str]]]:
    """Raw rows by split ('train' + 'eval', or 'all' when the source has a single split)."""
    source = config.dataset
    if source == SAMPLE_NAME:
        splits = {"all": [sample_path()]}
    elif Path(source).exists():
        splits = _local_files(Path(source))
    elif source == HUB_ID or "/" in source:
        return _load_hub(config, report)
    else:
        raise DataError(f"dataset: {source!r} is not '{SAMPLE_NAME}', an existing file/folder, or a Hub id")
    out: dict[str, list[dict[str, str]]] = {}
    for split, paths in splits.items():
        out[split] = []
        for path in paths:
            report.files.append(str(path))
            out[split].extend(read_jsonl(path, report, config.skip_bad_rows))
    if not any(out.values()):
        raise DataError(f"{source}: no usable rows")
    return out


def _load_hub(config: TrainConfig, report: DataReport) -> dict[str, list[dict[str, str]]]:
    """The Hub dataset (``Anthropic/hh-rlhf``, optionally a ``data_dir`` subset) via ``datasets``."""
    from datasets import load_dataset

    try:
        hub = load_dataset(config.dataset, data_dir=config.data_dir)
    except Exception as exc:  # offline, unknown id, ...: one line, the cause named
        raise DataError(f"dataset {config.dataset!r}: could not load from the Hub ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    names = {"train": "train", "test": "eval"}
    out = {}
    for hub_split, split in names.items():
        if hub_split in hub:
            rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in hub[hub_split]]
            report.rows_read += len(rows)
            out[split] = rows
    return out if len(out) == 2 else {"all": [r for rows in out.values() for r in rows]}


# ---------------------------------------------------------------------------------------------
# Prompt / answer split
# ---------------------------------------------------------------------------------------------

def split_dialogue(dialogue: str) -> tuple[str, str] | None:
    """(prompt ending in '\\n\\nAssistant:', answer) at the last assistant turn, or None."""
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


def to_pair(row: dict[str, str]) -> tuple[dict[str, str] | None, str | None]:
    """(pair, None) or (None, drop reason)."""
    chosen, rejected = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
    if chosen is None or rejected is None:
        return None, "no_assistant_turn"
    if chosen[0] != rejected[0]:
        return None, "prompt_mismatch"
    if not chosen[1].strip() or not rejected[1].strip():
        return None, "empty_answer"
    return {"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]}, None


# ---------------------------------------------------------------------------------------------
# Tokenize and truncate
# ---------------------------------------------------------------------------------------------

def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Fit prompt + longer answer into ``max_length``.

    The prompt loses its OLDEST tokens first (the latest turns are the context that matters),
    but not below ``max_prompt_length``; then answers are cut at the end. Returns the three id
    lists and whether the prompt / the answers were cut.
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    overflow = len(prompt_ids) + longest - max_length
    prompt_cut = answer_cut = False
    if overflow > 0:
        removable = max(0, len(prompt_ids) - max_prompt_length)
        drop = min(overflow, removable)
        if drop:
            prompt_ids = prompt_ids[drop:]
            prompt_cut = True
        room = max_length - len(prompt_ids)
        if longest > room:
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            answer_cut = True
    return prompt_ids, chosen_ids, rejected_ids, prompt_cut, answer_cut


def tokenize_pairs(pairs: list[dict[str, str]], tokenizer, config: TrainConfig, report: DataReport) -> dict[str, list]:
    """Columns for a datasets.Dataset: texts, token ids (EOS appended to answers) and ``length``."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([p["prompt"] for p in pairs], add_special_tokens=False)["input_ids"]
    chosens = tokenizer([p["chosen"] for p in pairs], add_special_tokens=False)["input_ids"]
    rejecteds = tokenizer([p["rejected"] for p in pairs], add_special_tokens=False)["input_ids"]
    columns: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids",
                                                 "rejected_ids", "length")}
    for pair, prompt_ids, chosen_ids, rejected_ids in zip(pairs, prompts, chosens, rejecteds, strict=True):
        prompt_ids, chosen_ids, rejected_ids, prompt_cut, answer_cut = truncate_pair(
            prompt_ids, chosen_ids + [eos], rejected_ids + [eos], config.max_length, config.max_prompt_length)
        if not chosen_ids or not rejected_ids:
            report.dropped["no_answer_after_truncation"] += 1
            continue
        report.truncated["prompt"] += prompt_cut
        report.truncated["answer"] += answer_cut
        for key, value in (("prompt", pair["prompt"]), ("chosen", pair["chosen"]), ("rejected", pair["rejected"]),
                           ("prompt_ids", prompt_ids), ("chosen_ids", chosen_ids),
                           ("rejected_ids", rejected_ids),
                           ("length", len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)))):
            columns[key].append(value)
    return columns


# ---------------------------------------------------------------------------------------------
# The whole pipeline, cached
# ---------------------------------------------------------------------------------------------

def _source_fingerprint(config: TrainConfig) -> str:
    """Content hash of local files (so an edited file invalidates the cache), or the Hub id."""
    if config.dataset == SAMPLE_NAME:
        paths = [sample_path()]
    elif Path(config.dataset).exists():
        paths = [p for ps in _local_files(Path(config.dataset)).values() for p in ps]
    else:
        return f"hub:{config.dataset}:{config.data_dir}"
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def data_cache_key(config: TrainConfig, tokenizer) -> str:
    parts = {
        "version": CACHE_VERSION,
        "source": _source_fingerprint(config),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "budget": [config.max_length, config.max_prompt_length],
        "split": [config.seed, config.eval_fraction, config.max_train_pairs, config.max_eval_pairs],
        "skip_bad_rows": config.skip_bad_rows,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(config: TrainConfig, tokenizer) -> tuple[DatasetDict, DataReport, str]:
    """Tokenized ``train`` / ``eval`` datasets, the data report and the cache key.

    Cached on disk (Arrow, via ``datasets``) keyed by a hash of source content, tokenizer and
    budget: the second run (and every sweep trial) skips reading and tokenizing.
    """
    key = data_cache_key(config, tokenizer)
    cache = Path(config.cache_dir or default_cache_dir()) / "data" / key
    if (cache / "report.json").exists():
        report_dict = json.loads((cache / "report.json").read_text())
        report = DataReport(**{**report_dict, "dropped": Counter(report_dict["dropped"]),
                               "truncated": Counter(report_dict["truncated"])})
        logger.info("data: cache hit %s", cache)
        logger.info(report.summary_line())
        return load_from_disk(str(cache / "dataset")), report, key

    report = DataReport(source=config.dataset, max_length=config.max_length,
                        max_prompt_length=config.max_prompt_length)
    raw = load_raw(config, report)
    pairs_by_split: dict[str, list[dict[str, str]]] = {}
    for split, rows in raw.items():
        pairs = []
        for row in rows:
            pair, reason = to_pair(row)
            if pair is None:
                report.dropped[reason] += 1
            else:
                pairs.append(pair)
        pairs_by_split[split] = pairs
    if "all" in pairs_by_split:
        pairs_by_split = seeded_split(pairs_by_split["all"], config.eval_fraction, config.seed)
    limits = {"train": config.max_train_pairs, "eval": config.max_eval_pairs}
    splits = {}
    for split, pairs in pairs_by_split.items():
        if limits[split] is not None:
            pairs = pairs[: limits[split]]
        columns = tokenize_pairs(pairs, tokenizer, config, report) if pairs else {"prompt": []}
        report.kept[split] = len(columns["prompt"])
        if not report.kept[split]:
            raise DataError(f"{config.dataset}: no usable pairs left for the {split} split ({report.summary_line()})")
        splits[split] = Dataset.from_dict(columns)
    dataset = DatasetDict(splits)
    logger.info(report.summary_line())

    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    dataset.save_to_disk(str(tmp / "dataset"))
    (tmp / "report.json").write_text(json.dumps(report.to_dict()))
    try:
        os.replace(tmp, cache)  # atomic: concurrent sweep workers never see half a cache
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(cache / "dataset")), report, key


def seeded_split(pairs: list[dict[str, str]], eval_fraction: float, seed: int) -> dict[str, list[dict[str, str]]]:
    """Deterministic shuffle + split: same seed, same held-out pairs, on any machine."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(pairs) * eval_fraction))
    return {"train": [pairs[i] for i in order[n_eval:]], "eval": [pairs[i] for i in order[:n_eval]]}
