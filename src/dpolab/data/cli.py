"""``dpolab data check``: prepare the data exactly as ``dpolab train`` would, and report it.

Same options as the training commands (every TrainConfig field, ``--config YAML``), the same code
path (:func:`dpolab.data.prepare_data` on the resolved config, with the model's tokenizer), but no
model weights are loaded and nothing is trained: a bad file, column or option fails here in
seconds with the same one-line error, and a good data set is left tokenized in the cache, so the
training run that follows skips the preparation.
"""

from __future__ import annotations

import argparse

from dpolab.config import TrainConfig
from dpolab.data.report import DataReport
from dpolab.paths import user_path
from dpolab.train_options import config_from, config_options


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="check preference data before training",
                                 description="Preference data commands.")
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check", help="validate data and config as `dpolab train` would and print the data report",
        parents=[config_options()], allow_abbrev=False,
        usage="dpolab data check [--config YAML] [--FIELD VALUE ...]",
        description="Read, convert, filter, split and tokenize the data exactly as `dpolab train` (or "
        "`dpolab sft`) with the same options would, using the model's tokenizer only (no weights), and "
        "print the data report: rows read, pairs kept per split, rows dropped per reason, truncations. "
        "Exit 0 when training could start on it, else one line naming the problem and exit 2.")
    check.add_argument("--config", type=user_path, help="YAML config file (the one you will train with)")
    check.set_defaults(func=run_check, known_options=[*TrainConfig.field_names(), "config"])


def run_check(args: argparse.Namespace) -> int:
    from dpolab.data.pipeline import prepare_data
    from dpolab.model import load_tokenizer

    config = config_from(args)
    _, report, key = prepare_data(config, load_tokenizer(config.model))
    print(report_text(report))
    print(f"ok: {sum(report.kept.values())} pairs ready for training (tokenized data cached, key {key})")
    return 0


def report_text(report: DataReport) -> str:
    """The data report as a few aligned lines, one source per line."""
    lines = [f"data: {report.source} (conversations rendered as: {report.chat_template})"]
    for source in report.sources:
        used = ", ".join(f"{split}={n}" for split, n in source.get("pairs", {}).items())
        lines.append(f"  source     {source['source']}: format {source['format']}, weight {source['weight']}, "
                     f"{source['rows_read']} rows read, pairs used {used or 'none'}")
    dropped = ", ".join(f"{reason}={n}" for reason, n in sorted(report.dropped.items())) or "none"
    lines += [f"  rows read  {report.rows_read}",
              f"  kept       {', '.join(f'{split}={n}' for split, n in report.kept.items())}",
              f"  dropped    {dropped}",
              f"  truncated  prompts={report.truncated['prompt']}, answers={report.truncated['answer']} "
              f"(max_length {report.max_length}, max_prompt_length {report.max_prompt_length})"]
    return "\n".join(lines)
