"""The whole data pipeline, cached: sources -> internal pairs -> drops counted -> mix -> split ->
tokenized, truncated ``train`` / ``eval`` datasets and the data report.

Everything between reading and the final Arrow files lives in ``datasets`` tables on disk (pairs
are written in record batches as they are read, batched ``map`` tokenizes them, ``num_proc`` workers when the data is
large), so memory does not grow with the size of the data set.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets

from dpolab.config import TrainConfig
from dpolab.data import formats, sources
from dpolab.data.formats import RowError
from dpolab.data.report import DataReport
from dpolab.data.templates import Formatter, resolve_formatter
from dpolab.data.tokenize import FLAG_COLUMNS, OUTPUT_COLUMNS, tokenize_batch
from dpolab.errors import DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = "3"  # bump when reading, formatting, tokenization or truncation rules change
BIG = 20_000  # rows from which tokenizing in several processes beats the cost of starting them
MAP_BATCH = 1000
WRITE_BATCH = 5000  # internal pairs per Arrow record batch


def default_cache_dir() -> Path:
    return Path(os.environ.get("DPOLAB_CACHE", Path.home() / ".cache" / "dpolab"))


def _pair_features() -> Any:
    from datasets import Features, Value

    text = Value("string")
    return Features({"prompt": text, "messages": [{"role": text, "content": text}], "chosen": text,
                     "rejected": text, "drop": text})


# ---------------------------------------------------------------------------------------------
# Reading one source into internal pairs (one row out per row in, ``drop`` says why not kept)
# ---------------------------------------------------------------------------------------------

def _rows(name: str, kind: str, split: str, paths: list[str], config: TrainConfig, work: str):
    if kind in ("sample", "files"):
        return sources.iter_files([Path(p) for p in paths], config.skip_bad_rows, work)
    table, split_name = sources.load_splits(name, kind, config, work)[split]
    return sources.iter_table(table, f"{name}[{split_name}]", None)


def _first_row(rows) -> dict[str, Any] | None:
    return next((row for _, row in rows if isinstance(row, dict)), None)


def _write_pairs(pairs: Iterator[dict[str, Any]], path: Path) -> Dataset:
    """Internal pairs to an Arrow file, a batch at a time (column-wise encoding: row-by-row
    ``Dataset.from_generator`` spends more time encoding than reading), memory-mapped back."""
    from datasets.arrow_writer import ArrowWriter

    features = _pair_features()
    with ArrowWriter(features=features, path=str(path)) as writer:
        while batch := list(itertools.islice(pairs, WRITE_BATCH)):
            writer.write_batch({key: [pair[key] for pair in batch] for key in features})
        writer.finalize()
    return Dataset.from_file(str(path))


def _pairs(name: str, kind: str, split: str, paths: list[str], config: TrainConfig, work: str, fmt: str,
           chat: bool) -> Iterator[dict[str, Any]]:
    """One internal pair per row read; ``drop`` names why a row is not used ("" when it is)."""
    mapping = formats.parse_columns(config.columns)
    for where, row in _rows(name, kind, split, paths, config, work):
        reason, pair = "bad_row", None
        if isinstance(row, dict):
            try:
                pair, reason = formats.adapt(formats.rename(row, mapping), fmt, chat)
            except RowError as exc:
                if not config.skip_bad_rows:
                    raise DataError(f"{where}: {exc}") from None
                logger.warning("%s: skipped bad row: %s", where, exc)
        else:
            logger.warning("%s: skipped bad row: %s", where, row)
        yield {**(pair or formats.EMPTY), "drop": reason or ""}


def read_source(spec: sources.SourceSpec, config: TrainConfig, formatter: Formatter, work: Path,
                report: DataReport) -> dict[str, Dataset]:
    """Internal pairs of one source by split ('train' + 'eval', or 'all'); its entry in the report."""
    kind = sources.kind(spec.name)
    if kind in ("sample", "files"):
        files = ({"all": [sources.sample_path()]} if kind == "sample" else sources.local_files(Path(spec.name)))
        plan = {split: [str(p) for p in paths] for split, paths in files.items()}
        report.files += [p for paths in plan.values() for p in paths]
        split_names = {"train": "train*", "eval": "test*", "all": "all files"}
    else:
        split_names = {s: table_and_name[1] for s, table_and_name in
                       sources.load_splits(spec.name, kind, config, str(work)).items()}
        plan = {split: [] for split in split_names}
    first_split = next(iter(plan))
    fmt = config.data_format
    mapping = formats.parse_columns(config.columns)
    if fmt == "auto" or mapping:
        first = _first_row(_rows(spec.name, kind, first_split, plan[first_split], config, str(work)))
        if first is None:
            raise DataError(f"{spec.name}: no usable rows")
        formats.check_columns(first, mapping, spec.name, in_mix=len(sources.parse_mix(config.dataset)) > 1)
        if fmt == "auto":
            fmt = formats.detect_format(formats.rename(first, mapping), spec.name)
    out: dict[str, Dataset] = {}
    for split, paths in plan.items():
        pairs = _pairs(spec.name, kind, split, paths, config, str(work), fmt, formatter.is_chat)
        out[split] = _write_pairs(pairs, work / f"pairs-{_name_hash(spec.name)}-{split}.arrow")
    entry = {"source": spec.name, "format": fmt, "weight": spec.weight,
             "splits": {split: split_names[split] for split in out},
             "rows_read": sum(len(d) for d in out.values())}
    report.sources.append(entry)
    return out


def _name_hash(text: str) -> str:
    """A fingerprint ``datasets`` can use in file names (source names hold '/' and ':')."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Drops, mix, split
# ---------------------------------------------------------------------------------------------

def _kept(dataset: Dataset, report: DataReport) -> list[int]:
    """Indices of usable pairs; the others are counted by reason."""
    drops = dataset.data.column("drop").to_pylist()  # the one column, straight from Arrow
    report.dropped.update(d for d in drops if d)
    return [i for i, d in enumerate(drops) if not d]


def mix(parts: list[tuple[Dataset, list[int], float]], seed: int) -> tuple[Dataset, list[int]]:
    """Weighted mix: the largest total whose shares fit every source (each share within one pair
    of its weight). One source is passed through in order."""
    if len(parts) == 1:
        dataset, kept, _ = parts[0]
        return dataset.select(kept), [len(kept)]
    total_weight = sum(w for _, _, w in parts)
    total = min(len(kept) / (w / total_weight) for _, kept, w in parts)
    chosen, used = [], []
    for i, (dataset, kept, weight) in enumerate(parts):
        take = min(len(kept), round(total * weight / total_weight))
        order = list(kept)
        random.Random(seed + i).shuffle(order)
        chosen.append(dataset.select(sorted(order[:take])))
        used.append(take)
    return concatenate_datasets(chosen), used


def seeded_split(n: int, eval_fraction: float, seed: int) -> dict[str, list[int]]:
    """Deterministic shuffle + split of ``n`` pairs: same seed, same held-out pairs, on any machine."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * eval_fraction))
    return {"train": order[n_eval:], "eval": order[:n_eval]}


def _splits(config: TrainConfig, by_source: list[dict[str, Dataset]], report: DataReport) -> dict[str, Dataset]:
    specs = sources.parse_mix(config.dataset)
    own_split = all(set(s) == {"train", "eval"} for s in by_source)
    if not own_split:  # one pool per source, divided by our seeded split after mixing
        by_source = [{"all": concatenate_datasets(list(s.values())) if len(s) > 1 else next(iter(s.values()))}
                     for s in by_source]
    out: dict[str, Dataset] = {}
    for split in ("train", "eval") if own_split else ("all",):
        parts = [(s[split], _kept(s[split], report), spec.weight) for s, spec in zip(by_source, specs, strict=True)]
        out[split], used = mix(parts, config.seed)
        for entry, n in zip(report.sources, used, strict=True):
            entry.setdefault("pairs", {})[split] = n
    if not own_split:
        pool = out.pop("all")
        out = {split: pool.select(indices) for split, indices in
               seeded_split(len(pool), config.eval_fraction, config.seed).items()} if len(pool) else {}
    limits = {"train": config.max_train_pairs, "eval": config.max_eval_pairs}
    return {split: ds.select(range(min(len(ds), limits[split]))) if limits[split] is not None else ds
            for split, ds in out.items()}


# ---------------------------------------------------------------------------------------------
# Cache key and the pipeline
# ---------------------------------------------------------------------------------------------

def _file_digest(path: Path, digest: Any) -> None:
    digest.update(path.name.encode())
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def _source_fingerprint(name: str, config: TrainConfig) -> str:
    """Content hash of local files (an edited file invalidates the cache), or the Hub id and options."""
    kind = sources.kind(name)
    if kind == "hub":
        return f"hub:{name}:{config.data_dir}:{config.data_files}"
    if kind == "disk":
        paths = sorted(p for p in Path(name).rglob("*") if p.is_file())
    elif kind == "sample":
        paths = [sources.sample_path()]
    else:
        paths = [p for ps in sources.local_files(Path(name)).values() for p in ps]
    digest = hashlib.sha256()
    for path in paths:
        _file_digest(path, digest)
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def data_cache_key(config: TrainConfig, tokenizer: Any) -> str:
    formatter = resolve_formatter(tokenizer, config.chat_template)
    parts = {
        "version": CACHE_VERSION,
        "sources": [[s.name, s.weight, _source_fingerprint(s.name, config)] for s in sources.parse_mix(config.dataset)],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "template": [formatter.name, formatter.template],
        "budget": [config.max_length, config.max_prompt_length],
        "split": [config.seed, config.eval_fraction, config.max_train_pairs, config.max_eval_pairs,
                  config.split, config.eval_split],
        "format": [config.data_format, config.columns],
        "skip_bad_rows": config.skip_bad_rows,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _tokenize(dataset: Dataset, tokenizer: Any, formatter: Formatter, config: TrainConfig, folder: Path,
              name: str, total_rows: int) -> Dataset:
    """Tokenized pairs, written by ``map`` as ``FOLDER/NAME*.arrow`` (one file per worker).

    ``total_rows``: the whole data set's size (all splits), which decides whether workers pay. Not
    the split's own size: a 10% eval split of full HH-RLHF (16k pairs) alone took 6.5 s in one process."""
    num_proc = config.dataset_num_proc or (min(os.cpu_count() or 1, 8) if total_rows >= BIG else None)
    return dataset.map(
        tokenize_batch, batched=True, batch_size=MAP_BATCH, num_proc=num_proc, remove_columns=dataset.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, formatter=formatter, max_length=config.max_length,
                       max_prompt_length=config.max_prompt_length),
        # An explicit fingerprint: hashing the tokenizer for ``datasets``' own cache costs seconds,
        # and our cache key already covers everything.
        new_fingerprint=f"{folder.name}-{name}", cache_file_name=str(folder / f"{name}.arrow"),
        desc=f"tokenizing {name}")


def _load_split(folder: Path, name: str) -> Dataset:
    """A split as ``map`` wrote it, memory-mapped, without the flag columns (no copy either way)."""
    files = sorted(folder.glob(f"{name}*.arrow"))
    parts = [Dataset.from_file(str(f)) for f in files]
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)).select_columns(list(OUTPUT_COLUMNS))


def _count_flags(dataset: Dataset, report: DataReport) -> None:
    import pyarrow.compute as pc

    for flag, part in zip(FLAG_COLUMNS, ("prompt", "answer"), strict=True):
        report.truncated[part] += pc.sum(dataset.data.column(flag)).as_py() or 0


def prepare_data(config: TrainConfig, tokenizer: Any) -> tuple[DatasetDict, DataReport, str]:
    """Tokenized ``train`` / ``eval`` datasets, the data report and the cache key.

    Cached on disk (the Arrow files ``map`` wrote, memory-mapped) keyed by a hash of source
    content, tokenizer, chat template, format options and budget: the second run (and every
    sweep trial) skips it all.
    """
    key = data_cache_key(config, tokenizer)
    cache = Path(config.cache_dir or default_cache_dir()) / "data" / key
    if not (cache / "report.json").exists():
        _build_cache(config, tokenizer, cache)
    else:
        logger.info("data: cache hit %s", cache)
    report = DataReport.from_dict(json.loads((cache / "report.json").read_text()))
    logger.info(report.summary_line())
    return DatasetDict({split: _load_split(cache, split) for split in ("train", "eval")}), report, key


def _build_cache(config: TrainConfig, tokenizer: Any, cache: Path) -> None:
    formatter = resolve_formatter(tokenizer, config.chat_template)
    report = DataReport(source=config.dataset, max_length=config.max_length,
                        max_prompt_length=config.max_prompt_length, chat_template=formatter.name)
    work = cache.with_name(cache.name + f".work{os.getpid()}")
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _build(config, tokenizer, formatter, report, work, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (tmp / "report.json").write_text(json.dumps(report.to_dict()))
    try:
        os.replace(tmp, cache)  # atomic: concurrent sweep workers never see half a cache
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _build(config: TrainConfig, tokenizer: Any, formatter: Formatter, report: DataReport, work: Path,
           out: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    by_source = [read_source(spec, config, formatter, work, report) for spec in sources.parse_mix(config.dataset)]
    report.rows_read = sum(entry["rows_read"] for entry in report.sources)
    if not any(len(d) for s in by_source for d in s.values()):
        raise DataError(f"{config.dataset}: no usable rows")
    splits = _splits(config, by_source, report)
    total_rows = sum(len(part) for part in splits.values())
    for split in ("train", "eval"):
        if split not in splits or not len(splits[split]):
            raise DataError(f"{config.dataset}: no usable pairs left for the {split} split ({report.summary_line()})")
        tokenized = _tokenize(splits[split], tokenizer, formatter, config, out, split, total_rows)
        if len(tokenized) < len(splits[split]):
            report.dropped["no_answer_after_truncation"] += len(splits[split]) - len(tokenized)
        _count_flags(tokenized, report)
        report.kept[split] = len(tokenized)
        if not report.kept[split]:
            raise DataError(f"{config.dataset}: no usable pairs left for the {split} split ({report.summary_line()})")


def prepare_eval_pairs(config: TrainConfig, tokenizer: Any) -> tuple[Dataset, DataReport]:
    """Every usable pair of ``config.split`` (files: all of them), tokenized: what ``dpolab evaluate
    MODEL --dataset SOURCE`` scores. Not cached (a one-off) and held in memory (evaluation sizes)."""
    formatter = resolve_formatter(tokenizer, config.chat_template)
    report = DataReport(source=config.dataset, max_length=config.max_length,
                        max_prompt_length=config.max_prompt_length, chat_template=formatter.name)
    work = Path(config.cache_dir or default_cache_dir()) / "data" / f"eval.work{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        by_source = [read_source(spec, config, formatter, work, report) for spec in sources.parse_mix(config.dataset)]
        report.rows_read = sum(entry["rows_read"] for entry in report.sources)
        parts = []
        for splits, spec in zip(by_source, sources.parse_mix(config.dataset), strict=True):
            pool = splits.get("train") or concatenate_datasets(list(splits.values()))
            parts.append((pool, _kept(pool, report), spec.weight))
        pool, _ = mix(parts, config.seed)
        if not len(pool):
            raise DataError(f"{config.dataset}: no usable pairs ({report.summary_line()})")
        tokenized = _tokenize(pool, tokenizer, formatter, config, work, "eval", len(pool))
        _count_flags(tokenized, report)
        pairs = Dataset.from_dict(tokenized.select_columns(list(OUTPUT_COLUMNS)).to_dict())  # off the work dir
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.kept["eval"] = len(pairs)
    return pairs, report
