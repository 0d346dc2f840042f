"""Preference data: sources (files, folders, Hub, mixes) -> formats (hh, explicit, conversational,
implicit, column mapping) -> templates (HH text or a chat template: the one formatting shared with
serving) -> tokenization (``datasets`` batched map) -> the data report. ``prepare_data`` runs it all."""

from dpolab.data.formats import FORMATS, to_pair
from dpolab.data.pipeline import (
    data_cache_key,
    default_cache_dir,
    prepare_data,
    prepare_eval_pairs,
    seeded_split,
)
from dpolab.data.report import DataReport
from dpolab.data.sources import read_jsonl, sample_path
from dpolab.data.templates import (
    Formatter,
    bind_template,
    hh_to_messages,
    resolve_formatter,
)
from dpolab.data.tokenize import LENGTH_COLUMNS, truncate_pair

__all__ = ["FORMATS", "LENGTH_COLUMNS", "DataReport", "Formatter", "bind_template", "data_cache_key",
           "default_cache_dir", "hh_to_messages", "prepare_data", "prepare_eval_pairs", "read_jsonl", "resolve_formatter",
           "sample_path", "seeded_split", "to_pair", "truncate_pair"]
