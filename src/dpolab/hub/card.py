"""The model card: YAML metadata the Hub indexes plus a body a reader can act on.

Everything comes from the run records (``run.json`` and its ``resolved`` block, ``config.yaml``,
``data_report.json``, ``summary.json``, the saved model's ``config.json`` and safetensors headers)
and, for a sweep, ``sweep.json`` / ``best.json`` / ``report/``: the card states what the run was
(stage, data, base, reference, template, precision, architecture, hardware), never a fixed text,
and leaves out what the records do not know. Nothing here reads the clock or the environment, so
the same records always give the same card, byte for byte.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from dpolab.data.sources import is_hub_dataset_id, parse_mix
from dpolab.errors import RunFolderError
from dpolab.hh import HUB_ID as HH_RLHF
from dpolab.hh import HUMAN, PROMPT_FORMAT, SAMPLE_NAME, SAMPLE_SUBSET, SAMPLING
from dpolab.model import BUILTIN_MODELS
from dpolab.report.collect import collect
from dpolab.report.table import (
    LENGTH_TABLE_COLUMNS,
    length_table_rows,
    table_rows,
    to_markdown,
    with_interval,
    with_pairs,
)
from dpolab.runs import RunFolder, SweepFolder

# Dataset sources that are HH-RLHF, and their subset.
HH_RLHF_SOURCES = {SAMPLE_NAME: SAMPLE_SUBSET, HH_RLHF: None}
# HH-RLHF's licence (the Hub release and the bundled sample, see its LICENSE).
HH_RLHF_LICENSE = "mit"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Card metadata key holding the DPO beta the model was trained with: `dpolab serve` scales the
# implicit rewards it shows for an export or Hub model by it.
BETA_METADATA = "dpolab_beta"

# (config key, label) in the order the hyperparameter table shows them.
HYPERPARAMETERS = [
    ("loss_type", "loss type"), ("beta", "beta"), ("label_smoothing", "label smoothing"),
    ("learning_rate", "learning rate"), ("lr_scheduler_type", "LR schedule"), ("warmup_ratio", "warm-up ratio"),
    ("per_device_train_batch_size", "batch size (pairs per device)"),
    ("gradient_accumulation_steps", "gradient accumulation steps"), ("weight_decay", "weight decay"),
    ("num_train_epochs", "epochs"), ("max_steps", "max steps"), ("max_grad_norm", "max grad norm"),
    ("max_length", "max length (tokens)"), ("max_prompt_length", "max prompt length (tokens)"),
    ("max_train_pairs", "max train pairs"), ("max_eval_pairs", "max eval pairs"),
    ("dtype", "dtype"), ("seed", "seed"),
]
DPO_ONLY = {"loss_type", "beta", "label_smoothing"}  # settings an SFT run has but does not use
# (summary["eval"] key, metric_type, metric_name) for the model-index, per stage.
EVAL_METRICS = {
    "dpo": [("loss", "loss", "DPO eval loss"),
            ("rewards/accuracies", "accuracy", "Reward accuracy (chosen reward > rejected)"),
            ("rewards/margins", "reward_margin", "Reward margin (chosen - rejected)"),
            ("rewards/accuracies_length_balanced", "accuracy_length_balanced",
             "Length-balanced reward accuracy (mean of chosen-longer and chosen-shorter pairs)"),
            ("length/chosen_longer", "accuracy_length_baseline",
             "Length-only baseline (the longer answer is preferred)")],
    # SFT's eval loss is the held-out chosen answers' mean negative log-likelihood per token.
    "sft": [("loss", "loss", "Held-out answer NLL (nats per token)")],
}


@dataclass(frozen=True)
class RunFacts:
    """What the card states about a run, read once from its records: the ``resolved`` block of
    ``run.json`` (docs/run-folder.md), the run's identity and the saved model's config. Runs
    recorded before the block existed leave unknown what they did not record."""

    stage: str  # "dpo" | "sft": the last stage
    base: str  # the pretrained model training started from (SFT -> DPO: the SFT run's start)
    sources: list[str]  # the data sources of every stage, each mix member on its own
    reference: str | None  # the frozen DPO reference as recorded; None for SFT
    reference_role: str | None  # "starting model" | "ref_model"
    dtype: str | None
    dtype_by: str | None  # how the dtype was chosen: "asked", "probe", ...
    template: dict[str, Any]  # {"name": "hh" | "tokenizer" | path, "sha256": of the template text}
    device: str | None
    hardware: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)  # see model_architecture

    @property
    def chat(self) -> bool:
        return self.template.get("name", "hh") != "hh"

    @property
    def hh_only(self) -> bool:
        return bool(self.sources) and all(s in HH_RLHF_SOURCES for s in self.sources)


def run_facts(run: RunFolder) -> RunFacts:
    info, resolved = run.info(), run.resolved()
    previous = info.get("previous_stage") or {}
    stage = resolved.get("stage") or info.get("stage") or "dpo"
    report = _optional(run.data_report, {})
    template = resolved.get("chat_template") or ({"name": report["chat_template"]} if "chat_template" in report else {})
    choice = resolved.get("dtype_choice") or {}
    return RunFacts(
        stage=stage,
        base=previous.get("base_model") or info.get("base_model", ""),
        sources=[spec.name for dataset in (previous.get("dataset"), info.get("dataset")) if dataset
                 for spec in parse_mix(dataset)],
        reference=run.reference_model() if stage == "dpo" else None,
        reference_role=(resolved.get("reference") or {}).get("role"),
        dtype=resolved.get("dtype") or _optional(run.summary, {}).get("dtype"),
        dtype_by=choice.get("by"), template=template, device=resolved.get("device"),
        hardware=resolved.get("hardware") or {}, architecture=model_architecture(run.model_dir))


def model_architecture(model_dir: Path) -> dict[str, Any]:
    """``model_type``, class, parameter count and context window of a saved model, from its
    ``config.json`` and the safetensors headers (no weights are loaded); {} when there is none."""
    from safetensors import safe_open

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        return {}
    parameters = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            parameters += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    return {"model_type": config.get("model_type"), "class": (config.get("architectures") or [None])[0],
            "parameters": parameters or None,
            "context": config.get("max_position_embeddings") or config.get("n_positions")}


def hub_datasets(sources: list[str]) -> list[str]:
    """The Hub dataset ids among ``sources`` (the bundled sample is HH-RLHF's); local files have none."""
    return sorted({HH_RLHF if s in HH_RLHF_SOURCES else s for s in sources
                   if s in HH_RLHF_SOURCES or (is_hub_dataset_id(s) and not Path(s).exists())})


def known_license(facts: RunFacts) -> str | None:
    """The licence when the records know it: HH-RLHF data (MIT) on a dpolab built-in, whose
    random weights carry no licence of their own. Any other base model's licence governs its
    fine-tunes and no record names it; other data's licence is the user's to state: unknown."""
    return HH_RLHF_LICENSE if facts.hh_only and facts.base in BUILTIN_MODELS else None


def is_hub_model_id(name: str) -> bool:
    """True for a Hub id (``gpt2``, ``openai-community/gpt2``); False for a dpolab built-in (random
    init, not on the Hub) or a local folder, which must not become ``base_model`` metadata."""
    return name not in BUILTIN_MODELS and not Path(name).exists() and bool(HUB_ID.match(name))


def summary_win_rate(summary: dict[str, Any]) -> float | None:
    """The policy's win rate over the reference when ``dpolab evaluate --judge`` measured one
    (``summary["win_rate"]``, see :func:`dpolab.evaluate.generation.win_rate_summary`)."""
    record = summary.get("win_rate")
    return float(record["win_rate"]) if record else None


def _escaped(text: str) -> str:
    """``text`` with newlines shown as ``\\n``, as a user types it into code."""
    return text.encode("unicode_escape").decode()


def _optional(read, default=None):
    try:
        return read()
    except (RunFolderError, FileNotFoundError):
        return default


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def eval_results(run: RunFolder, facts: RunFacts) -> tuple[list[EvalResult], dict[str, float]]:
    """model-index entries and the plain {metric_type: value} they hold (what tests compare).

    The Hub's model-index names its data set by Hub id (``dataset.type``, required there): a run on
    local files, or on a mix of several data sets, gets no entries; the card's body still shows the
    values."""
    info, summary = run.info(), run.summary()
    own = [spec.name for spec in parse_mix(info["dataset"])] if info.get("dataset") else []
    ids = hub_datasets(own)
    dataset = ids[0] if len(ids) == 1 and all(hub_datasets([s]) for s in own) else None
    sft = facts.stage == "sft"
    common = {
        "task_type": "text-generation",
        "task_name": "Supervised fine-tuning (held-out answer NLL)" if sft else "Preference modelling (DPO implicit reward)",
        "dataset_type": dataset,
        "dataset_name": f"{'HH-RLHF' if dataset == HH_RLHF else dataset} held-out "
                        + ("chosen answers" if sft else "preference pairs"),
        "dataset_config": info.get("data_dir") or (HH_RLHF_SOURCES.get(own[0]) if dataset == HH_RLHF else None),
        "dataset_split": "eval",
    }
    values: dict[str, float] = {}
    results = []
    for key, metric_type, metric_name in EVAL_METRICS[facts.stage]:
        value = (summary.get("eval") or {}).get(key)
        if isinstance(value, int | float):
            values[metric_type] = float(value)
            results.append(EvalResult(metric_type=metric_type, metric_name=metric_name,
                                      metric_value=float(value), **common))
    rate = summary_win_rate(summary)
    if rate is not None:
        values["win_rate"] = rate
        results.append(EvalResult(metric_type="win_rate", metric_name="Win rate (generation eval)",
                                  metric_value=rate, **{**common, "task_name": "Generation win rate"}))
    return (results if dataset else []), values


def card_data(run: RunFolder, adapter_only: bool = False) -> ModelCardData:
    info, facts = run.info(), run_facts(run)
    results, _ = eval_results(run, facts)
    model_type = facts.architecture.get("model_type")
    tags = [facts.stage, *([model_type] if model_type else []), *(["rlhf"] if facts.stage == "dpo" else []),
            "dpolab", *(["lora", "peft"] if adapter_only else [])]
    return ModelCardData(
        language="en" if facts.hh_only else None,  # HH-RLHF is English; other data: not known here
        license=known_license(facts),
        library_name="peft" if adapter_only else "transformers",
        # Only a real Hub id: the Hub links base_model to that repo, and a built-in is not one.
        base_model=facts.base if is_hub_model_id(facts.base) else None,
        datasets=hub_datasets(facts.sources) or None,
        tags=tags,
        pipeline_tag="text-generation",
        model_name=info.get("name", run.path.name),
        eval_results=results or None,
        # The run record verbatim, whatever kind of model it names (built-in, Hub id or folder).
        dpolab_base_model=facts.base,
        dpolab_reference_model=facts.reference,
        dpolab_dtype=facts.dtype,
        **{BETA_METADATA: run.config().get("beta")},
    )


def _model_text(name: str) -> str:
    """A model as a reader can find it: a built-in described, a Hub id linked, a folder named as local."""
    if name in BUILTIN_MODELS:
        shape = BUILTIN_MODELS[name]
        return (f"`{name}`, a dpolab built-in: the GPT-2 architecture (n_layer={shape['n_layer']}, "
                f"n_embd={shape['n_embd']}, n_head={shape['n_head']}) with a **seeded random initialisation** "
                "and the real GPT-2 tokenizer. It is *not* pretrained GPT-2 and not on the Hub, so expect little "
                "fluency: such models exist to test the training pipeline end to end.")
    if is_hub_model_id(name):
        return f"[`{name}`](https://huggingface.co/{name})."
    return f"`{name}`, a local model folder (not on the Hub)."


def _reference_text(facts: RunFacts, info: dict[str, Any]) -> str:
    """The frozen DPO reference as recorded, and how it relates to the starting model."""
    previous = info.get("previous_stage")
    if facts.reference_role == "ref_model" or (facts.reference and facts.reference != info.get("base_model")):
        return f"{_model_text(facts.reference)} It was given as `ref_model`: not the model training started from."
    if previous:
        return f"the SFT model it started from (run `{previous.get('name')}`), frozen."
    return "the starting model (above), frozen."


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _template_text(template: dict[str, Any]) -> str:
    name, sha = template.get("name"), template.get("sha256")
    what = ("the base model's own chat template" if name == "tokenizer" else
            f"the chat template file `{Path(str(name)).name}`")
    return what + (f" (sha256 `{sha}`)" if sha else "")


def _facts_lines(facts: RunFacts, info: dict[str, Any]) -> list[str]:
    """The bullet list under the title: what the model is, from what, against what, in what, where."""
    arch = facts.architecture
    hardware = facts.hardware
    out = [f"- Base model: {_model_text(facts.base)}" + (
        " Fine-tuned by SFT first (see Training procedure)." if info.get("previous_stage") else "")]
    if facts.stage == "dpo":
        out.append(f"- Reference model (the frozen model the DPO rewards are measured against): "
                   f"{_reference_text(facts, info)}")
    if arch:
        out.append(f"- Architecture: `{arch['model_type']}` (`{arch['class']}`)"
                   + (f", {_params(arch['parameters'])} parameters" if arch.get("parameters") else "")
                   + (f", context window {arch['context']} tokens" if arch.get("context") else "") + ".")
    out.append("- Precision: " + (f"trained in **{facts.dtype}**" + (f" (chosen by: {facts.dtype_by})"
                                                                     if facts.dtype_by else "") + "."
                                  if facts.dtype else "not recorded by this run."))
    if facts.template:
        out.append("- Prompt format: " + ("HH text (`\\n\\nHuman:` / `\\n\\nAssistant:` turns, see below)." if not facts.chat else
                                          _template_text(facts.template) + ", saved with the tokenizer."))
    if hardware.get("gpu"):
        out.append(f"- Hardware: {hardware.get('gpus', 1)} x {hardware['gpu']} ({hardware.get('gpu_memory_gb')} GB).")
    elif hardware.get("cpu"):
        flags = ", ".join(hardware.get("cpu_bf16") or []) or "none"
        where = "CPU" if facts.device in (None, "cpu") else f"{facts.device} (host CPU"
        out.append(f"- Hardware: {where} {hardware['cpu']}" + (")" if where != "CPU" else "")
                   + f", bf16 instructions: {flags}.")
    out.append(f"- Training engine: `{info.get('engine', 'dpolab')}`" + (
        f", dpolab {info['dpolab_version']}" if info.get("dpolab_version") else "") + ".")
    license_ = known_license(facts)
    out.append(f"- Licence: {license_.upper()} (HH-RLHF's; the built-in base has no licence of its own)."
               if license_ else "- Licence: not stated here: the base model's licence and the data's terms apply.")
    return out


def _dataset_text(info: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    dataset = info.get("dataset", "")
    specs = parse_mix(dataset) if dataset else []
    if dataset == SAMPLE_NAME:
        lines = [f"Data: the HH-RLHF harmless-base test split bundled with dpolab ([{HH_RLHF}]"
                 f"(https://huggingface.co/datasets/{HH_RLHF})), split into train and held-out pairs."]
    elif dataset == HH_RLHF:
        subset = info.get("data_dir") or "all subsets"
        lines = [f"Data: [{HH_RLHF}](https://huggingface.co/datasets/{HH_RLHF}) ({subset})."]
    elif len(specs) > 1:
        lines = [f"Data: a weighted mix of {len(specs)} sources (below)."]
    elif hub_datasets([dataset]):
        lines = [f"Data: the Hub dataset [{dataset}](https://huggingface.co/datasets/{dataset})."]
    else:
        lines = [f"Data: `{dataset}`, the user's own local data (not on the Hub)."]
    lines += _sources_lines(report)
    if report:
        kept = report.get("kept") or {}
        dropped = report.get("dropped") or {}
        truncated = report.get("truncated") or {}
        lines += ["", "| data report | |", "|---|---|", f"| rows read | {report.get('rows_read', '—')} |"]
        lines += [f"| pairs kept ({split}) | {n} |" for split, n in kept.items()]
        lines += [f"| pairs dropped ({reason.replace('_', ' ')}) | {n} |" for reason, n in dropped.items()]
        lines += [f"| pairs truncated ({part}) | {n} |" for part, n in truncated.items()]
    return lines


def _sources_lines(report: dict[str, Any] | None) -> list[str]:
    """Every source of the data with its split, weight and format, and the chat template (reports
    written before dpolab read several formats have neither: nothing is claimed for them)."""
    sources = (report or {}).get("sources") or []
    if not sources:
        return []
    lines = ["", "| source | split | weight | format | pairs used |", "|---|---|---|---|---|"]
    for entry in sources:
        splits = ", ".join(f"{ours}: `{theirs}`" for ours, theirs in (entry.get("splits") or {}).items())
        used = sum((entry.get("pairs") or {}).values())
        lines.append(f"| `{entry['source']}` | {splits} | {_fmt(entry.get('weight'))} | {entry.get('format')} | "
                     f"{used} |")
    template = report.get("chat_template", "hh")
    lines += ["", "Prompt format: " + ("HH text (`\\n\\nHuman: ...\\n\\nAssistant:`)." if template == "hh"
                                       else f"chat template (`{template}`), rendered with `apply_chat_template`.")]
    return lines


def _lora_text(config: dict[str, Any], base: str, adapter_only: bool, model_ref: str) -> list[str]:
    """How the LoRA run trained, and for an adapter-only export what base it needs and how to load it."""
    targets = ", ".join(config.get("lora_target_modules") or []) or "the architecture's default modules"
    out = [f"Parameter-efficient: LoRA adapters (rank {config['lora_r']}, alpha {_fmt(config.get('lora_alpha'))}, "
           f"on {targets}) trained on the frozen base model" +
           (" loaded in 4-bit NF4 (QLoRA)." if config.get("load_in_4bit") else "."), ""]
    if not adapter_only:
        return out
    needs = ("**This repository holds the LoRA adapter only**, not full weights: it applies to the base "
             f"model `{base}` (the base named in `adapter_config.json`)")
    if is_hub_model_id(base):
        return out + [needs + ":", "", "```python", "from peft import PeftModel",
                      "from transformers import AutoModelForCausalLM", "",
                      f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                      f'model = PeftModel.from_pretrained(base, "{model_ref}")', "```", ""]
    if base in BUILTIN_MODELS:
        return out + [needs + ", a dpolab built-in that is **not on the Hub** (a seeded random initialisation): "
                      f'only dpolab builds it (`dpolab.model.build_builtin("{base}")`).', ""]
    return out + [needs + ", a local model folder that is **not on the Hub**: the adapter is of no use without "
                  "that model. Publish the base model, or export the merged model instead (`dpolab export` "
                  "without `--adapter-only`).", ""]


def _stages_text(info: dict[str, Any], config: dict[str, Any], facts: RunFacts) -> list[str]:
    """What trained the model: SFT, DPO, or the standard recipe's SFT then DPO (both stages named)."""
    dpo = (f"DPO (Rafailov et al., 2023) with loss type `{config.get('loss_type')}` and beta = "
           f"{_fmt(config.get('beta'))}: the policy is trained directly on preference pairs")
    if facts.stage == "sft":
        return [f"Supervised fine-tuning (SFT) of `{info.get('base_model')}` on the chosen answers of "
                f"`{info.get('dataset')}`; the loss is the answer tokens' negative log-likelihood (prompt "
                "tokens are context only).", ""]
    separate = facts.reference_role == "ref_model"
    previous = info.get("previous_stage")
    if not previous:
        reference = f"`{facts.reference}` (`ref_model`)" if separate else "the frozen starting model"
        return [f"{dpo}, with {reference} as the reference; no reward model and no RL loop. The loss "
                "is computed on answer tokens only.", ""]
    reference = (f"with `{facts.reference}` (`ref_model`) as the frozen reference" if separate
                 else "which is also the frozen reference")
    return ["Two stages, the DPO paper's recipe:", "",
            f"1. **SFT**: supervised fine-tuning of `{previous.get('base_model')}` on the chosen answers of "
            f"`{previous.get('dataset')}` (run `{previous.get('name')}`).",
            f"2. **DPO** on `{info.get('dataset')}`: {dpo}, starting from the SFT model, {reference}. The loss is "
            "computed on answer tokens only.", ""]


def _prompt_format_lines(facts: RunFacts) -> list[str]:
    if facts.chat:
        return ["## Prompt format", "",
                f"The model was trained on chats rendered with {_template_text(facts.template)}. The template "
                "is saved with the tokenizer (`tokenizer.chat_template`), so "
                "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders a prompt as "
                "training did; the model ends its turn with the template's end-of-turn token.", ""]
    return ["## Prompt format", "",
            "The model continues a dialogue in the HH text format; end the prompt with the assistant tag:", "",
            "```text", _escaped(PROMPT_FORMAT.format(message="{your message}")), "```", "",
            f"Multi-turn prompts repeat `{_escaped(PROMPT_FORMAT.format(message='...'))} ...`. Stop generation at "
            f"the next `{_escaped(HUMAN)}` turn (`stop_sequence` below): the model may otherwise write the "
            "user's next turn itself.", ""]


def _evaluation_lines(facts: RunFacts, metrics: dict[str, float], evaluation: dict[str, Any]) -> list[str]:
    sft = facts.stage == "sft"
    labels = {"loss": "held-out answer NLL (nats per token)" if sft else "DPO eval loss",
              "accuracy": "reward accuracy", "reward_margin": "reward margin",
              "accuracy_length_balanced": "length-balanced reward accuracy",
              "accuracy_length_baseline": "length-only baseline accuracy", "win_rate": "win rate (generation eval)"}
    out = ["## Evaluation", "", "On the held-out " + ("pairs' chosen answers" if sft else "preference pairs")
           + ", after training:", "", "| metric | value |", "|---|---|"]
    out += [f"| {labels[key]} | {value:.4f} |" for key, value in metrics.items()]
    if "win_rate" not in metrics:
        out.append("\nNo generation win rate was measured for this run.")
    out += ["", "The NLL is the mean negative log-likelihood of each held-out chosen answer's tokens given its "
            "prompt (lower is better)." if sft else
            "Reward accuracy is the fraction of pairs whose implicit reward "
            "beta * log(pi(y|x) / pi_ref(y|x)) ranks the chosen answer above the rejected one; the margin is "
            "the mean reward gap.", ""]
    return out if sft else out + _length_text(evaluation)


def _usage_lines(facts: RunFacts, model_ref: str, usable: bool) -> list[str]:
    """How to generate with the model; ``usable``: the repository loads on its own (not an adapter
    whose base is off the Hub)."""
    if not usable:
        return ["## Usage", "", "Load the base model and apply the adapter as *Training procedure* says.", ""]
    if facts.chat:
        code = [f'generator = pipeline("text-generation", model="{model_ref}")',
                'messages = [{"role": "user", "content": "How do I make a cup of tea?"}]',
                f"out = generator(messages, max_new_tokens={SAMPLING['max_new_tokens']})",
                'print(out[0]["generated_text"][-1]["content"])']
        note = "The chat template renders the messages; generation stops at the model's end-of-turn (EOS) token."
    else:
        code = [f'generator = pipeline("text-generation", model="{model_ref}")',
                f'prompt = "{_escaped(PROMPT_FORMAT.format(message="How do I make a cup of tea?"))}"',
                f'out = generator(prompt, max_new_tokens={SAMPLING["max_new_tokens"]}, '
                f'stop_sequence="{_escaped(HUMAN)}", return_full_text=False)',
                'print(out[0]["generated_text"])']
        note = ("The stop at the next Human turn is a call argument, not part of `generation_config.json`, "
                "because transformers refuses stop strings in a saved generation config unless every caller "
                "also passes the tokenizer.")
    return ["## Usage", "", "With transformers:", "", "```python", "from transformers import pipeline", "", *code,
            "```", "",
            f"The generation config samples (temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}) "
            f"and uses the model's EOS token as padding. {note}", "",
            "In dpolab's chat web app:", "", "```bash", f"dpolab serve {model_ref}", "```", ""]


def _limitations_lines(facts: RunFacts, config: dict[str, Any]) -> list[str]:
    training = "supervised fine-tuning" if facts.stage == "sft" else "preference training"
    data = ("It was trained on HH-RLHF, whose dialogues include harmful requests (red-teaming data). The "
            if facts.hh_only else "It was trained on the data named above, which dpolab does not vet. The ")
    context = facts.architecture.get("context")
    out = ["## Intended use and limitations", "",
           f"- A small **research** model for studying {training}, not an assistant for real use.",
           f"- {data}model **can produce harmful, offensive, false or biased text**, and {training} does not "
           "make it safe. Do not deploy it to users without your own safety measures.",
           "- " + ("English only; " if facts.hh_only else "")
           + (f"the architecture's context window is {context} tokens and " if context else "")
           + f"the model was trained on {_fmt(config.get('max_length'))}-token examples.",
           "- The evaluation above measures " + (
               "the likelihood of held-out answers" if facts.stage == "sft" else
               "agreement with held-out " + ("human " if facts.hh_only else "") + "preferences")
           + ", not helpfulness or safety of generated text.", ""]
    return out


DPO_CITATION = ["@inproceedings{rafailov2023direct,",
                "  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},",
                "  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and "
                "Manning, Christopher D. and Finn, Chelsea},",
                "  booktitle = {Advances in Neural Information Processing Systems},",
                "  year      = {2023},",
                "  url       = {https://arxiv.org/abs/2305.18290}",
                "}"]
HH_CITATION = ["@article{bai2022training,",
               "  title   = {Training a Helpful and Harmless Assistant with Reinforcement Learning from Human "
               "Feedback},",
               "  author  = {Bai, Yuntao and Jones, Andy and Ndousse, Kamal and others},",
               "  journal = {arXiv preprint arXiv:2204.05862},",
               "  year    = {2022},",
               "  url     = {https://arxiv.org/abs/2204.05862}",
               "}"]


def _citation_lines(facts: RunFacts) -> list[str]:
    """The papers this run used: DPO for a DPO stage, HH-RLHF for its data."""
    entries = [e for used, e in ((facts.stage == "dpo", DPO_CITATION),
                                 (any(s in HH_RLHF_SOURCES for s in facts.sources), HH_CITATION)) if used]
    if not entries:
        return []
    return ["## Citation", "", "```bibtex", *"\n\n".join("\n".join(e) for e in entries).split("\n"), "```", ""]


def _length_text(evaluation: dict[str, Any]) -> list[str]:
    """The length-controlled evaluation (``dpolab.scoring.length``), when the run recorded it."""
    if "length/chosen_longer" not in evaluation:
        return []
    rows = [("reward accuracy", with_interval(evaluation, "rewards/accuracies")),
            ("length-only baseline (longer answer preferred)", with_interval(evaluation, "length/chosen_longer")),
            ("length-balanced reward accuracy", with_interval(evaluation, "rewards/accuracies_length_balanced")),
            ("reward accuracy, chosen answer longer (pairs)", with_pairs(evaluation, "chosen_longer")),
            ("reward accuracy, chosen answer shorter (pairs)", with_pairs(evaluation, "chosen_shorter")),
            ("reward accuracy, lengths within 5 tokens (pairs)", with_pairs(evaluation, "similar_length")),
            ("residual accuracy (margin above its fit on length)",
             with_interval(evaluation, "rewards/accuracies_length_residual")),
            ("Spearman rho, margin vs length difference", _fmt(evaluation.get("length/margin_spearman"))),
            ("mean answer tokens, chosen / rejected",
             f"{evaluation['length/chosen_tokens']:.1f} / {evaluation['length/rejected_tokens']:.1f}")]
    return ["### Length-controlled evaluation", "",
            "DPO can learn to prefer longer answers rather than better ones. The length-only baseline is the "
            "accuracy of always preferring the answer with more tokens; the length-balanced accuracy averages "
            "the reward accuracy over pairs whose chosen answer is longer and pairs whose chosen answer is "
            "shorter, so a model that only learned length scores 0.5 on it. Brackets: 95% bootstrap intervals.", "",
            "| metric | value |", "|---|---|", *[f"| {label} | {value} |" for label, value in rows], ""]


def card_body(run: RunFolder, sweep: SweepFolder | None, plots: list[str], repo_id: str | None,
              adapter_only: bool = False) -> str:
    info, config, summary = run.info(), run.config(), run.summary()
    facts = run_facts(run)
    report = _optional(run.data_report)
    name = info.get("name", run.path.name)
    model_ref = repo_id or "USER/NAME"
    _, metrics = eval_results(run, facts)
    arch = facts.architecture.get("model_type")
    how = {"sft": "**supervised fine-tuning (SFT)**",
           "dpo": "SFT and then **Direct Preference Optimization (DPO)**" if info.get("previous_stage")
           else "**Direct Preference Optimization (DPO)**"}[facts.stage]
    data = ("Anthropic's HH-RLHF human preference pairs (helpfulness / harmlessness)" if facts.hh_only
            else "the data below")
    if facts.stage == "sft":
        data = f"the chosen answers of {data}"
    out: list[str] = [f"# {name}", "",
                      f"A {f'`{arch}`-architecture ' if arch else ''}causal language model fine-tuned with {how} "
                      f"on {data}, trained with dpolab.", "", *_facts_lines(facts, info)]
    if sweep is not None:
        best = _optional(sweep.best, {})
        out.append(f"- Chosen as the best trial (`{best.get('trial', name)}`) of the sweep "
                   f"`{sweep.info().get('name', sweep.path.name)}` by {best.get('objective', 'its objective')}.")
    out += ["", *_prompt_format_lines(facts), *_evaluation_lines(facts, metrics, summary.get("eval") or {})]
    out += ["## Training procedure", "", *_stages_text(info, config, facts)]
    base = info.get("base_model", "")
    if config.get("lora_r"):
        out += _lora_text(config, base, adapter_only, model_ref)
    out += _dataset_text(info, report)
    out += ["", "### Hyperparameters", "", "| hyperparameter | value |", "|---|---|"]
    shown = [(key, label) for key, label in HYPERPARAMETERS
             if key in config and not (facts.stage == "sft" and key in DPO_ONLY)]
    out += [f"| {label} | {_fmt(config[key])} |" if key != "dtype" or config[key] == facts.dtype or not facts.dtype
            else f"| {label} | {config[key]} (resolved: {facts.dtype}) |" for key, label in shown]
    train = summary.get("train") or {}
    if train.get("steps") is not None:
        out.append(f"| optimizer steps run | {train['steps']} |")
    if sweep is not None:
        trials = collect(sweep.path).trials
        out += ["", "## Sweep", "", to_markdown(table_rows(trials)).strip()]
        if length_table_rows(trials):
            out += ["", "Length-controlled, on the same held-out pairs:", "",
                    to_markdown(length_table_rows(trials), LENGTH_TABLE_COLUMNS).strip()]
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{Path(p).stem}]({p})" for p in plots]
    out += ["", *_usage_lines(facts, model_ref, usable=not adapter_only or is_hub_model_id(base))]
    out += [*_limitations_lines(facts, config), *_citation_lines(facts)]
    return "\n".join(out)


def build_card(run: RunFolder, sweep: SweepFolder | None = None, plots: list[str] | None = None,
               repo_id: str | None = None, adapter_only: bool = False) -> ModelCard:
    """The card for ``run``; ``plots`` are paths relative to the export folder; ``repo_id`` only
    fills the usage snippets; ``adapter_only``: the export holds a LoRA adapter, not full weights."""
    data = card_data(run, adapter_only)
    # to_yaml keeps ModelCardData's fixed field order: the metadata block is the same every time.
    content = f"---\n{data.to_yaml()}\n---\n\n{card_body(run, sweep, plots or [], repo_id, adapter_only)}"
    return ModelCard(content)
