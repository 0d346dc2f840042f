"""``dpolab export``: a run (or a sweep's best trial) as a standard Hugging Face model folder.

    OUT/
      model.safetensors, config.json, generation_config.json   (save_pretrained)
      tokenizer.json, tokenizer_config.json, ...               (the tokenizer's save_pretrained)
      README.md                                                 (model card, see card.py)
      plots/*.png, plots/table.md                               (a sweep's ``dpolab report`` output)

The layout is what ``from_pretrained``, the pipeline, the Hub and ``dpolab serve`` expect, nothing
more. Same input -> byte-identical files: the writers used here emit no timestamps and keep a fixed
key order (checked by the tests), and file order never reaches the files' contents.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from dpolab.errors import RunFolderError
from dpolab.hh import SAMPLING
from dpolab.runs import RunFolder, SweepFolder, give_default_modes, resolve_run

EOS_ID = 50256  # GPT-2's <|endoftext|>: EOS, BOS and (dpolab's choice) padding
REQUIRED_FILES = ("config.json", "model.safetensors", "README.md")
# An --adapter-only export of a LoRA run: the PEFT adapter instead of full weights.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PLOTS_DIR = "plots"


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    run: RunFolder
    files: list[str]  # relative POSIX paths, sorted


def is_export(path: str | Path) -> bool:
    """A folder ``dpolab export`` wrote: the HF files plus a model card tagged ``dpolab``."""
    path = Path(path)
    if not any(all((path / name).is_file() for name in files)
               for files in (REQUIRED_FILES, (*ADAPTER_FILES, "README.md"))):
        return False
    from huggingface_hub import ModelCard

    try:
        tags = ModelCard.load(path / "README.md").data.tags or []
    except Exception:  # an unparsable README is simply not one of ours
        return False
    return "dpolab" in tags


def list_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _save_model(run: RunFolder, out: Path) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    # dtype="auto" keeps the dtype training saved instead of silently upcasting a bf16 model.
    model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype="auto")
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else EOS_ID
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else eos
    # A fresh GenerationConfig (not the run's) so the export's defaults are dpolab's, not whatever the
    # training run happened to carry. No stop_strings: transformers raises on generate() when a saved
    # config has them and the caller passes no tokenizer, which would break the plain pipeline; the
    # card documents `stop_sequence="\n\nHuman:"` instead.
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
                                               do_sample=True, **SAMPLING)
    model.save_pretrained(out)  # transformers 5 always writes safetensors (no pickle option left)


def _save_adapter(run: RunFolder, out: Path) -> None:
    """The LoRA adapter as training saved it; its config names the base model it applies to."""
    if not run.has_adapter():
        raise RunFolderError(f"{run.path}: not a LoRA run (no adapter/); --adapter-only needs a run trained "
                             "with lora_r > 0")
    for name in ADAPTER_FILES:
        shutil.copyfile(run.adapter_dir / name, out / name)


def _save_tokenizer(run: RunFolder, out: Path) -> None:
    from transformers import AutoTokenizer

    from dpolab.model import load_tokenizer

    if (run.model_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    else:  # runs that saved only weights: the tokenizer is the base model's
        tokenizer = load_tokenizer(run.info()["base_model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)


def _copy_report(sweep: SweepFolder | None, out: Path) -> list[str]:
    """Copy the sweep report's plots and table; return the plot paths for the card, sorted."""
    if sweep is None or not sweep.report_dir.is_dir():
        return []
    plots = []
    for src in sorted(sweep.report_dir.iterdir()):
        if src.is_file() and (src.suffix == ".png" or src.name == "table.md"):
            (out / PLOTS_DIR).mkdir(exist_ok=True)
            shutil.copyfile(src, out / PLOTS_DIR / src.name)  # copyfile: content only, no mtimes
            if src.suffix == ".png":
                plots.append(f"{PLOTS_DIR}/{src.name}")
    return plots


def export(source: str | Path, out_dir: str | Path, repo_id: str | None = None,
           adapter_only: bool = False) -> ExportResult:
    """Export ``source`` (run folder, or sweep folder -> its best trial) to ``out_dir``.

    A LoRA run exports its merged model (a plain HF folder) unless ``adapter_only``: then the
    PEFT adapter alone, with a card naming its base model.

    ``out_dir`` must be absent, empty or an earlier export (which is replaced whole, so files of an
    older export never linger). ``repo_id`` only fills the card's usage snippets.
    """
    from dpolab.hub.card import build_card

    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise RunFolderError(f"{source}: no such folder")
    sweep = SweepFolder.open(source) if SweepFolder.is_sweep(source) else None
    run = resolve_run(source)
    if not run.has_model():
        raise RunFolderError(f"{run.path}: run has no final model yet (training unfinished?)")
    if not run.summary_path.is_file():
        raise RunFolderError(f"{run.path}: run has no summary.json (training unfinished?)")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_export(out_dir))):
        raise RunFolderError(f"{out_dir}: exists and is not an earlier dpolab export; refusing to overwrite it")
    if out_dir.resolve() in (run.path.resolve(), run.model_dir.resolve()):
        raise RunFolderError(f"{out_dir}: cannot export into the run folder itself")

    # Build next to the target and swap at the end: a failed export leaves no half folder behind.
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        (_save_adapter if adapter_only else _save_model)(run, partial)
        _save_tokenizer(run, partial)
        plots = _copy_report(sweep, partial)
        card = build_card(run, sweep, plots, repo_id, adapter_only=adapter_only)
        (partial / "README.md").write_text(card.content, encoding="utf-8", newline="\n")
        give_default_modes(partial)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return ExportResult(out_dir=out_dir, run=run, files=list_files(out_dir))
