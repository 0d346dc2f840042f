"""Where preference rows come from: local files or folders, ``save_to_disk`` folders, Hub datasets,
and weighted mixes of them (``a.jsonl:0.7,org/other:0.3``).

Each source is read split by split into rows ``(location, row)``; ``location`` (``file:line``,
``file:row N`` or ``id[split] row N``) is what a one-line error names. JSON Lines files are read
line by line here, not by pyarrow's JSON reader: only a line reader can name the bad line of a
malformed file or skip (and count) it with ``skip_bad_rows``. CSV, Parquet, ``.json`` arrays, Hub
datasets and ``save_to_disk`` folders are read by ``datasets`` (Arrow, memory-mapped).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dpolab.errors import ConfigError, DataError, first_line
from dpolab.hh import SAMPLE_NAME

LINE_FILES = (".jsonl", ".jsonl.gz")
TABLE_FILES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> datasets builder

# ORG/NAME; a name that starts like a path (., /, ~) is not one.
HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Row = tuple[str, Any]  # (location, a dict or the RowError/DataError text of a malformed row)


class BadRow(str):
    """A malformed row's message (its location is carried beside it)."""


def sample_path() -> Path:
    """The bundled real sample: HH-RLHF harmless-base test split, 2,312 rows (MIT, see LICENSE beside it)."""
    return Path(str(resources.files("dpolab") / "resources" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"))


@dataclass(frozen=True)
class SourceSpec:
    name: str
    weight: float = 1.0


def parse_mix(spec: str) -> list[SourceSpec]:
    """``'a.jsonl:0.7,org/other:0.3'`` -> sources with weights; one source needs no weight."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    specs = []
    for item in items:
        name, _, weight = item.rpartition(":")
        try:
            value = float(weight) if name else None
        except ValueError:
            value = None
        if value is None:
            if len(items) > 1:
                raise ConfigError(f"dataset: {item!r} needs a weight in a mix (SOURCE:WEIGHT,SOURCE:WEIGHT)")
            specs.append(SourceSpec(item))
            continue
        if value <= 0:
            raise ConfigError(f"dataset: weight of {name!r} must be > 0, got {value}")
        specs.append(SourceSpec(name, value))
    if not specs:
        raise ConfigError("dataset: empty")
    return specs


def _data_files(folder: Path) -> list[Path]:
    suffixes = LINE_FILES + tuple(TABLE_FILES)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def local_files(source: Path) -> dict[str, list[Path]]:
    """Files of a local source, by split. A folder holding ``train*`` and ``test*`` files keeps the
    release's own split; anything else is one split that we divide ourselves."""
    if source.is_file():
        return {"all": [source]}
    files = _data_files(source)
    if not files:
        raise DataError(f"{source}: no *.jsonl, *.jsonl.gz, *.json, *.csv or *.parquet files found")
    train = [p for p in files if p.name.startswith("train")]
    test = [p for p in files if p.name.startswith("test")]
    if train and test and len(train) + len(test) == len(files):
        return {"train": train, "eval": test}
    return {"all": files}


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def is_hub_dataset_id(name: str) -> bool:
    """``ORG/NAME`` as the Hub spells dataset ids; never a data file's name or a deeper path."""
    return bool(HUB_DATASET_ID.match(name)) and not name.endswith(LINE_FILES + tuple(TABLE_FILES))


def kind(name: str) -> str:
    """'sample', 'files', 'disk' (a save_to_disk folder) or 'hub'."""
    if name == SAMPLE_NAME:
        return "sample"
    path = Path(name)
    if path.exists():
        return "disk" if is_saved_dataset(path) else "files"
    if is_hub_dataset_id(name):
        return "hub"
    # Asking the Hub for what can only be a mistyped local path would spend its retries (tens of
    # seconds) before failing.
    raise DataError(f"dataset: {name!r} is not '{SAMPLE_NAME}', an existing file/folder, or a Hub id (ORG/NAME)"
                    if "/" not in name else f"dataset: {name!r}: no such file or folder")


def iter_jsonl(path: Path, skip_bad_rows: bool) -> Iterator[Row]:
    """Rows of one ``.jsonl`` / ``.jsonl.gz`` file. A malformed line raises :class:`DataError`
    naming file and line, or with ``skip_bad_rows`` comes out as a :class:`BadRow` (counted). A
    truncated gzip stream is always an error: the rows after the cut are lost, no count could say how many."""
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0

    def bad(message: str) -> BadRow:
        if not skip_bad_rows:
            raise DataError(f"{path}:{line_no}: {message}")
        return BadRow(message)

    try:
        with opener(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):  # noqa: B007 (used by bad())
                if not raw.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    yield where, bad(f"not valid UTF-8 (byte {exc.start})")
                    continue
                except json.JSONDecodeError as exc:
                    yield where, bad(f"invalid JSON ({exc.msg} at column {exc.colno})")
                    continue
                yield where, row if isinstance(row, dict) else bad(
                    f"expected a JSON object, got {type(row).__name__}")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip stream after line {line_no} ({exc})") from None
    if line_no == 0:
        raise DataError(f"{path}: empty file (no rows)")


def load_table(path: Path, cache_dir: str) -> Any:
    """A CSV / Parquet / JSON file as a ``datasets.Dataset`` (one line naming the file on failure).

    CSV cells are read as the text they hold: an empty cell is ``""`` (as in JSON Lines, so an empty
    answer is dropped and counted, not a type error), and ``NA``, ``null`` or ``None`` stay words
    instead of pandas' missing values."""
    from datasets import load_dataset

    builder = TABLE_FILES[path.suffix]
    options = {"keep_default_na": False} if builder == "csv" else {}
    try:
        if builder == "csv":
            _check_csv_has_rows(path)
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **options)
    except DataError:
        raise
    except Exception as exc:  # pyarrow's many error types: the cause goes in the one line
        cause = exc.__cause__ or exc.__context__
        detail = first_line(cause, with_type=True) if cause and str(cause).strip() else first_line(exc)
        raise DataError(f"{path}: could not read as {builder} ({detail})") from None


def _check_csv_has_rows(path: Path) -> None:
    """A CSV file with no row under its header (or no header) fails here, naming the file: ``datasets``
    would say only 'Instruction "train" corresponds to no data!'. Reads the header and one row."""
    import pandas as pd

    try:
        first = pd.read_csv(path, nrows=1)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (no rows)") from None
    if first.empty:
        raise DataError(f"{path}: no rows, only the header ({', '.join(map(str, first.columns))})")


def iter_table(dataset: Any, label: str, first_line: int | None) -> Iterator[Row]:
    """Rows of a datasets table; ``first_line`` maps row 0 to a file line (CSV: 2, under the header)."""
    for i, row in enumerate(dataset):
        yield (f"{label}:{first_line + i}" if first_line else f"{label} row {i}"), row


def iter_files(paths: list[Path], skip_bad_rows: bool, cache_dir: str) -> Iterator[Row]:
    for path in paths:
        if path.name.endswith(LINE_FILES):
            yield from iter_jsonl(path, skip_bad_rows)
        else:
            yield from iter_table(load_table(path, cache_dir), str(path), 2 if path.suffix == ".csv" else None)


def load_splits(name: str, source_kind: str, config: Any, cache_dir: str) -> dict[str, Any]:
    """A Hub dataset or ``save_to_disk`` folder by split ('train' + 'eval', or 'all')."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    try:
        if source_kind == "disk":
            loaded = load_from_disk(name)
        else:
            loaded = load_dataset(name, data_dir=config.data_dir, data_files=_hub_files(config.data_files),
                                  cache_dir=cache_dir)
    except Exception as exc:  # offline, unknown id, ...: one line, the cause named
        raise DataError(f"dataset {name!r}: could not load ({first_line(exc, with_type=True)})") from None
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({config.split: loaded})
    if config.split not in loaded:
        raise DataError(f"dataset {name!r}: no split {config.split!r} (splits: {sorted(loaded)})")
    eval_split = config.eval_split or ("test" if "test" in loaded and config.split != "test" else None)
    if eval_split and eval_split not in loaded:
        raise DataError(f"dataset {name!r}: no split {eval_split!r} (splits: {sorted(loaded)})")
    if eval_split:
        return {"train": (loaded[config.split], config.split), "eval": (loaded[eval_split], eval_split)}
    return {"all": (loaded[config.split], config.split)}


def _hub_files(spec: str | None) -> Any:
    return [f.strip() for f in spec.split(",") if f.strip()] if spec else None


def read_jsonl(path: Path, skip_bad_rows: bool = False) -> list[dict[str, Any]]:
    """All well-formed rows of a small ``.jsonl`` file (the pipeline streams; this is for checks)."""
    return [row for _, row in iter_jsonl(path, skip_bad_rows) if isinstance(row, dict)]
