"""The data report: what the pipeline read, kept and dropped (by reason), and from where.

Saved with every run as ``data_report.json``; the model card and ``dpolab report`` read it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataReport:
    """Counts over the whole pipeline. ``sources`` has one entry per source of a mix (its format,
    splits, weight and how many pairs it gave); ``chat_template`` names how conversations became text."""

    source: str
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    max_length: int = 0
    max_prompt_length: int = 0
    sources: list[dict[str, Any]] = field(default_factory=list)
    chat_template: str = "hh"

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
            "sources": self.sources,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataReport:
        return cls(**{**values, "dropped": Counter(values["dropped"]), "truncated": Counter(values["truncated"])})

    def summary_line(self) -> str:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        kept = ", ".join(f"{k}={v}" for k, v in self.kept.items()) or "none"
        return (f"data: read {self.rows_read} rows from {self.source}; kept {kept}; dropped {dropped}; "
                f"truncated prompts={self.truncated['prompt']} answers={self.truncated['answer']}")
