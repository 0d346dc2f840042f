"""The model card: YAML metadata the Hub indexes plus a body a reader can act on.

Everything comes from the run records (``run.json``, ``config.yaml``, ``data_report.json``,
``summary.json``) and, for a sweep, ``sweep.json`` / ``best.json`` / ``report/``. Nothing here reads
the clock or the environment, so the same records always give the same card, byte for byte.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

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
TAGS = ["dpo", "gpt2", "rlhf", "dpolab"]
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
# (summary["eval"] key, metric_type, metric_name) for the model-index.
EVAL_METRICS = [
    ("loss", "loss", "DPO eval loss"),
    ("rewards/accuracies", "accuracy", "Reward accuracy (chosen reward > rejected)"),
    ("rewards/margins", "reward_margin", "Reward margin (chosen - rejected)"),
    ("rewards/accuracies_length_balanced", "accuracy_length_balanced",
     "Length-balanced reward accuracy (mean of chosen-longer and chosen-shorter pairs)"),
    ("length/chosen_longer", "accuracy_length_baseline", "Length-only baseline (the longer answer is preferred)"),
]


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


def eval_results(run: RunFolder) -> tuple[list[EvalResult], dict[str, float]]:
    """model-index entries and the plain {metric_type: value} they hold (what tests compare)."""
    info, summary = run.info(), run.summary()
    dataset = info.get("dataset", "")
    hh = dataset in HH_RLHF_SOURCES
    common = {
        "task_type": "text-generation",
        "task_name": "Preference modelling (DPO implicit reward)",
        "dataset_type": HH_RLHF if hh else dataset,
        "dataset_name": "HH-RLHF held-out preference pairs" if hh else f"{dataset} held-out preference pairs",
        "dataset_config": info.get("data_dir") or HH_RLHF_SOURCES.get(dataset),
        "dataset_split": "eval",
    }
    values: dict[str, float] = {}
    results = []
    for key, metric_type, metric_name in EVAL_METRICS:
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
    return results, values


def card_data(run: RunFolder, adapter_only: bool = False) -> ModelCardData:
    info = run.info()
    base, dataset = info.get("base_model", ""), info.get("dataset", "")
    previous = info.get("previous_stage") or {}
    if previous:  # SFT -> DPO: the pretrained base is the SFT run's
        base = previous.get("base_model", base)
    datasets = {HH_RLHF for d in (dataset, previous.get("dataset")) if d in HH_RLHF_SOURCES}
    results, _ = eval_results(run)
    return ModelCardData(
        language="en",
        license="mit",
        library_name="peft" if adapter_only else "transformers",
        # Only a real Hub id: the Hub links base_model to that repo, and a built-in is not one.
        base_model=base if is_hub_model_id(base) else None,
        datasets=sorted(datasets) or None,
        tags=[*TAGS, "lora", "peft"] if adapter_only else TAGS,
        pipeline_tag="text-generation",
        model_name=info.get("name", run.path.name),
        eval_results=results or None,
        # The run record verbatim, whatever kind of base it was (built-in, Hub id or folder).
        dpolab_base_model=base,
        **{BETA_METADATA: run.config().get("beta")},
    )


def _base_model_text(base: str, is_reference: bool = True) -> str:
    if base in BUILTIN_MODELS:
        shape = BUILTIN_MODELS[base]
        return (f"`{base}`, a dpolab built-in: the GPT-2 architecture (n_layer={shape['n_layer']}, "
                f"n_embd={shape['n_embd']}, n_head={shape['n_head']}) with a **seeded random initialisation** "
                "and the real GPT-2 tokenizer. It is *not* pretrained GPT-2, so expect little fluency: such "
                "models exist to test the training pipeline end to end.")
    role = " (also the frozen DPO reference model)" if is_reference else ""
    if is_hub_model_id(base):
        return f"[`{base}`](https://huggingface.co/{base}){role}."
    return f"`{base}`, a local model folder{role}."


def _dataset_text(info: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    dataset = info.get("dataset", "")
    if dataset == SAMPLE_NAME:
        lines = [f"Data: the HH-RLHF harmless-base test split bundled with dpolab ([{HH_RLHF}]"
                 f"(https://huggingface.co/datasets/{HH_RLHF})), split into train and held-out pairs."]
    elif dataset == HH_RLHF:
        subset = info.get("data_dir") or "all subsets"
        lines = [f"Data: [{HH_RLHF}](https://huggingface.co/datasets/{HH_RLHF}) ({subset})."]
    else:
        lines = [f"Data: `{dataset}`."]
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
    lines += ["", "Prompt format: " + ("HH-RLHF text (`\\n\\nHuman: ...\\n\\nAssistant:`)." if template == "hh"
                                       else f"chat template (`{template}`), rendered with `apply_chat_template`.")]
    return lines


def _lora_text(config: dict[str, Any], base: str, adapter_only: bool, model_ref: str) -> list[str]:
    """How the LoRA run trained, and for an adapter-only export how to load it onto its base."""
    targets = ", ".join(config.get("lora_target_modules") or []) or "the architecture's default modules"
    out = [f"Parameter-efficient: LoRA adapters (rank {config['lora_r']}, alpha {_fmt(config.get('lora_alpha'))}, "
           f"on {targets}) trained on the frozen base model" +
           (" loaded in 4-bit NF4 (QLoRA)." if config.get("load_in_4bit") else "."), ""]
    if adapter_only:
        out += [f"**This repository holds the LoRA adapter only**, not full weights: apply it to the base "
                f"model `{base}` (the base named in `adapter_config.json`):", "", "```python",
                "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{model_ref}")', "```", ""]
    return out


def _stages_text(info: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """What trained the model: SFT, DPO, or the standard recipe's SFT then DPO (both stages named)."""
    dpo = (f"DPO (Rafailov et al., 2023) with loss type `{config.get('loss_type')}` and beta = "
           f"{_fmt(config.get('beta'))}: the policy is trained directly on preference pairs")
    if info.get("stage") == "sft":
        return [f"Supervised fine-tuning (SFT) of `{info.get('base_model')}` on the chosen answers of "
                f"`{info.get('dataset')}`; the loss is the answer tokens' negative log-likelihood (prompt "
                "tokens are context only). This is the first stage of the DPO recipe.", ""]
    previous = info.get("previous_stage")
    if not previous:
        return [f"{dpo}, with the frozen base model as the reference; no reward model and no RL loop. The loss "
                "is computed on answer tokens only.", ""]
    return ["Two stages, the DPO paper's recipe:", "",
            f"1. **SFT**: supervised fine-tuning of `{previous.get('base_model')}` on the chosen answers of "
            f"`{previous.get('dataset')}` (run `{previous.get('name')}`).",
            f"2. **DPO** on `{info.get('dataset')}`: {dpo}, starting from the SFT model, which is also the "
            "frozen reference. The loss is computed on answer tokens only.", ""]


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
    report = _optional(run.data_report)
    name = info.get("name", run.path.name)
    model_ref = repo_id or "USER/NAME"
    _, metrics = eval_results(run)
    out: list[str] = [f"# {name}", ""]
    out += [
        "A GPT-2-architecture causal language model fine-tuned with **Direct Preference Optimization "
        "(DPO)** on Anthropic's HH-RLHF human preference pairs (helpfulness / harmlessness), trained with "
        "dpolab.", "",
        f"- Base model: {_base_model_text((info.get('previous_stage') or info).get('base_model', ''), not info.get('previous_stage'))}" + (
            " Fine-tuned by SFT first; the SFT model is the DPO reference (see Training procedure)."
            if info.get("previous_stage") else ""),
        f"- Training engine: `{info.get('engine', 'dpolab')}`" + (
            f", dpolab {info['dpolab_version']}" if info.get("dpolab_version") else ""),
    ]
    if sweep is not None:
        best = _optional(sweep.best, {})
        out.append(f"- Chosen as the best trial (`{best.get('trial', name)}`) of the sweep "
                   f"`{sweep.info().get('name', sweep.path.name)}` by {best.get('objective', 'its objective')}.")
    out += ["", "## Prompt format", "",
            "The model continues a dialogue in HH-RLHF's format; end the prompt with the assistant tag:", "",
            "```text", _escaped(PROMPT_FORMAT.format(message="{your message}")), "```", "",
            f"Multi-turn prompts repeat `{_escaped(PROMPT_FORMAT.format(message='...'))} ...`. Stop generation at "
            f"the next `{_escaped(HUMAN)}` turn (`stop_sequence` below): the model may otherwise write the "
            "user's next turn itself.", ""]
    out += ["## Evaluation", "", "On the held-out preference pairs, after training:", "",
            "| metric | value |", "|---|---|"]
    labels = {"loss": "DPO eval loss", "accuracy": "reward accuracy", "reward_margin": "reward margin",
              "accuracy_length_balanced": "length-balanced reward accuracy",
              "accuracy_length_baseline": "length-only baseline accuracy", "win_rate": "win rate (generation eval)"}
    out += [f"| {labels[key]} | {value:.4f} |" for key, value in metrics.items()]
    if "win_rate" not in metrics:
        out.append("\nNo generation win rate was measured for this run.")
    out += ["", "Reward accuracy is the fraction of pairs whose implicit reward "
            "beta * log(pi(y|x) / pi_ref(y|x)) ranks the chosen answer above the rejected one; the margin is "
            "the mean reward gap.", ""]
    out += _length_text(summary.get("eval") or {})
    out += ["## Training procedure", "", *_stages_text(info, config)]
    if config.get("lora_r"):
        out += _lora_text(config, info.get("base_model", ""), adapter_only, model_ref)
    out += _dataset_text(info, report)
    out += ["", "### Hyperparameters", "", "| hyperparameter | value |", "|---|---|"]
    out += [f"| {label} | {_fmt(config[key])} |" for key, label in HYPERPARAMETERS if key in config]
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
    out += ["", "## Usage", "", "With transformers:", "", "```python", "from transformers import pipeline", "",
            f'generator = pipeline("text-generation", model="{model_ref}")',
            f'prompt = "{_escaped(PROMPT_FORMAT.format(message="How do I make a cup of tea?"))}"',
            f'out = generator(prompt, max_new_tokens={SAMPLING["max_new_tokens"]}, stop_sequence="{_escaped(HUMAN)}",'
            " return_full_text=False)",
            'print(out[0]["generated_text"])', "```", "",
            f"The generation config samples (temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}) "
            "and uses `<|endoftext|>` as both EOS "
            "and padding. The stop at the next Human turn is a call argument, not part of "
            "`generation_config.json`, because transformers refuses stop strings in a saved generation "
            "config unless every caller also passes the tokenizer.", "",
            "In dpolab's chat web app:", "", "```bash", f"dpolab serve {model_ref}", "```", ""]
    out += ["## Intended use and limitations", "",
            "- A small **research** model for studying preference optimisation, not an assistant for real use.",
            "- It was trained on HH-RLHF, whose dialogues include harmful requests (red-teaming data). The "
            "model **can produce harmful, offensive, false or biased text**, and preference training does not "
            "make it safe. Do not deploy it to users without your own safety measures.",
            "- English only; the GPT-2 context window is 1024 tokens and the model was trained on "
            f"{_fmt(config.get('max_length'))}-token pairs.",
            "- The evaluation above measures agreement with held-out human preferences, not helpfulness or "
            "safety of generated text.", ""]
    out += ["## Citation", "", "```bibtex",
            "@inproceedings{rafailov2023direct,",
            "  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},",
            "  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and "
            "Manning, Christopher D. and Finn, Chelsea},",
            "  booktitle = {Advances in Neural Information Processing Systems},",
            "  year      = {2023},",
            "  url       = {https://arxiv.org/abs/2305.18290}",
            "}", "",
            "@article{bai2022training,",
            "  title   = {Training a Helpful and Harmless Assistant with Reinforcement Learning from Human "
            "Feedback},",
            "  author  = {Bai, Yuntao and Jones, Andy and Ndousse, Kamal and others},",
            "  journal = {arXiv preprint arXiv:2204.05862},",
            "  year    = {2022},",
            "  url     = {https://arxiv.org/abs/2204.05862}",
            "}", "```", ""]
    return "\n".join(out)


def build_card(run: RunFolder, sweep: SweepFolder | None = None, plots: list[str] | None = None,
               repo_id: str | None = None, adapter_only: bool = False) -> ModelCard:
    """The card for ``run``; ``plots`` are paths relative to the export folder; ``repo_id`` only
    fills the usage snippets; ``adapter_only``: the export holds a LoRA adapter, not full weights."""
    data = card_data(run, adapter_only)
    # to_yaml keeps ModelCardData's fixed field order: the metadata block is the same every time.
    content = f"---\n{data.to_yaml()}\n---\n\n{card_body(run, sweep, plots or [], repo_id, adapter_only)}"
    return ModelCard(content)
