"""What the web app serves: the DPO model, its reference, and the run records describing them.

Loaded once at start-up (see :class:`dpolab.serve.generation.Engine`), then shared read-only by
every request. torch/transformers are imported inside functions so `dpolab --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab.config import TrainConfig
from dpolab.errors import DpolabError, RunFolderError, first_line
from dpolab.runs import RunFolder, SweepFolder, is_model_folder, latest_result, resolve_model_dir, resolve_run

DEFAULT_BETA = TrainConfig.beta  # used (and said so) when nothing records the model's training beta
HYPERPARAMETERS = ("beta", "loss_type", "label_smoothing", "learning_rate", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_ratio",
                   "max_length", "max_prompt_length", "max_train_pairs", "seed")
ADAPTER_CONFIG = "adapter_config.json"
EVAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
             "rewards/accuracies_length_balanced", "length/chosen_longer")


@dataclass
class LoadedModel:
    """One causal LM ready to generate: ``id`` is its name in the APIs (OpenAI ``model``)."""

    id: str
    source: str
    model: Any
    tokenizer: Any

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))


@dataclass
class ServedModels:
    policy: LoadedModel
    reference: LoadedModel | None
    beta: float  # scales the rewards: the model's training beta, else DEFAULT_BETA (beta_known False)
    beta_known: bool = True
    info: dict[str, Any] = field(default_factory=dict)  # the model panel (GET /api/model)
    sweep_dir: Path | None = None  # set when the model is a sweep's best trial (experiments page)

    def context_length(self) -> int:
        lengths = [m.context_length for m in (self.policy, self.reference) if m is not None]
        return min(lengths)

    def by_id(self, model_id: str | None) -> LoadedModel | None:
        if model_id is None or model_id == self.policy.id:
            return self.policy
        if self.reference is not None and model_id == self.reference.id:
            return self.reference
        return None


def default_source(runs_dir: str | Path = "runs") -> str:
    """The most recent finished run or sweep under ``runs_dir`` (what `dpolab serve` shows)."""
    latest = latest_result(runs_dir)
    if latest is None:
        raise DpolabError(
            f"no MODEL given and no finished run or sweep under {Path(runs_dir).resolve()}: "
            "train one first (dpolab train / dpolab sweep) or pass MODEL (a run, sweep or export "
            "folder, or a Hub id such as gpt2)")
    return str(latest)


def describe(source: str) -> tuple[dict[str, Any], RunFolder | None, Path | None]:
    """The model panel's records for ``source``: (info, run or None, sweep folder or None)."""
    path = Path(source)
    run: RunFolder | None = None
    sweep_dir: Path | None = None
    info: dict[str, Any] = {"source": source}
    if SweepFolder.is_sweep(path):
        sweep = SweepFolder.open(path)
        run, sweep_dir = resolve_run(path), path
        best = sweep.best()
        info.update(kind="sweep", sweep={"name": path.name, "trial": best.get("trial"),
                                         "objective": best.get("objective"), "value": best.get("value")})
    elif RunFolder.is_run(path):
        run = resolve_run(path)
        info["kind"] = "run"
    elif (path / ADAPTER_CONFIG).is_file():  # `dpolab export --adapter-only`: a LoRA adapter on a named base
        from dpolab.lora import adapter_base

        info.update(kind="adapter", base_model=adapter_base(path))
    elif is_model_folder(path):
        info["kind"] = "export"
        if RunFolder.is_run(path.parent):  # someone passed runs/NAME/model: use its run's records
            run = RunFolder.open(path.parent)
        elif not has_tokenizer(path):
            raise RunFolderError(f"{path}: model folder has no tokenizer (tokenizer_config.json); "
                                 "an incomplete copy or export?")
    elif path.exists():
        raise RunFolderError(f"{path}: not a dpolab run, sweep or model folder")
    else:
        info["kind"] = "hub"
    if run is not None:
        _check_finished(run)
        run_info = run.info()
        config = run.config() if run.config_path.exists() else {}
        summary = run.summary() if run.summary_path.exists() else {}
        info.update(
            run=run.path.name, base_model=run_info.get("base_model"), dataset=run_info.get("dataset"),
            # The reference the run trained against (its record), not a guess from the base model.
            reference_model=run.reference_model(), dtype=run.resolved().get("dtype"),
            engine=run_info.get("engine"),
            hyperparameters={k: config[k] for k in HYPERPARAMETERS if k in config},
            eval={k: summary.get("eval", {})[k] for k in EVAL_KEYS if k in summary.get("eval", {})},
            train=summary.get("train", {}), wall_time_s=summary.get("wall_time_s"))
    return info, run, sweep_dir


def has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer_config.json").is_file()


def _check_finished(run: RunFolder) -> None:
    """Refuse, before the server starts, a run that training did not finish writing (killed after
    the weights but before the tokenizer or the summary): it would load, answer /healthz, then fail
    every generation. The same checks as `dpolab export`."""
    if not run.has_model():
        raise RunFolderError(f"{run.path}: run has no final model yet (training unfinished?)")
    if not has_tokenizer(run.model_dir):
        raise RunFolderError(f"{run.model_dir}: model folder has no tokenizer (tokenizer_config.json); "
                             "training unfinished?")
    if not run.summary_path.is_file():
        raise RunFolderError(f"{run.path}: run has no summary.json (training unfinished?)")


def trained_beta(source: str, info: dict[str, Any]) -> tuple[float | None, str | None]:
    """The beta the model was trained with and where it was read: its run's config.yaml, else the
    model card an export or Hub model carries (``dpolab export`` writes it into the metadata).
    (None, None) when nothing says."""
    if "beta" in info.get("hyperparameters", {}):
        return float(info["hyperparameters"]["beta"]), "config.yaml"
    if info.get("kind") == "export":
        card: Path | None = Path(source) / "README.md"
    elif info.get("kind") == "hub" and source not in _builtin_models():
        card = _hub_card(source)
    else:
        card = None
    if card is None or not card.is_file():
        return None, None
    from huggingface_hub import ModelCard

    from dpolab.hub.card import BETA_METADATA

    beta = ModelCard.load(card).data.to_dict().get(BETA_METADATA)
    if isinstance(beta, int | float) and not isinstance(beta, bool) and beta > 0:
        return float(beta), "model card"
    return None, None


def _builtin_models() -> dict[str, Any]:
    from dpolab.model import BUILTIN_MODELS

    return BUILTIN_MODELS


def _hub_card(repo_id: str) -> Path | None:
    """The Hub model's README.md (its card), from the local cache when the model came from there."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "README.md"))
    except Exception:  # offline, no card, private: any failure only means "beta unknown"
        return None


def _model_name(source: str, info: dict[str, Any]) -> str:
    if info.get("kind") == "sweep":
        return f"{info['sweep']['name']}/{info['sweep']['trial']}"
    if info.get("run"):
        return str(info["run"])
    return Path(source).name if Path(source).exists() else source


def load_one(model_id: str, source: str, precision: str = "fp32") -> LoadedModel:
    from dpolab.generate import load_for_generation
    from dpolab.model import load_tokenizer

    try:
        model = load_for_generation(source, precision)
        tokenizer = load_tokenizer(source)
    except DpolabError:
        raise
    except (OSError, ValueError) as exc:
        # Not a local folder and the Hub could not provide it (offline, typo, private repo).
        raise DpolabError(f"could not load model {source!r}: {first_line(exc)}") from None
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(id=model_id, source=source, model=model, tokenizer=tokenizer)


def load_served_models(source: str, reference: str | None = None, precision: str = "fp32") -> ServedModels:
    """Load the DPO model behind ``source`` and its reference (``reference``, else the one the run
    recorded, else its base model),
    both in ``precision`` (see :func:`dpolab.generate.load_for_generation`)."""
    info, run, sweep_dir = describe(source)
    if info["kind"] == "adapter":
        policy, ref = load_adapter(_model_name(source, info), source, reference, precision)
    else:
        model_dir = str(resolve_model_dir(source)) if info["kind"] in ("run", "sweep", "export") else source
        policy = load_one(_model_name(source, info), model_dir, precision)
        ref = None
    # SFT runs have no reference: their base model is what they are compared with.
    reference_source = reference or info.get("reference_model") or info.get("base_model")
    if reference_source and ref is None:
        ref_id = str(reference_source)
        if ref_id == policy.id:
            ref_id = f"{ref_id}-reference"
        ref = load_one(ref_id, str(reference_source), precision)
    beta, beta_source = trained_beta(source, info)
    info.update(model=policy.id, reference=ref.id if ref else None, beta=beta, beta_source=beta_source,
                precision=precision, compare=ref is not None,
                context_length=min(m.context_length for m in (policy, ref) if m))
    if beta is None and ref is not None:
        info["beta_note"] = (f"beta unknown: this model's records do not say which beta it was trained with; "
                             f"rewards use {DEFAULT_BETA}, TrainConfig's default")
    if ref is None:
        info["note"] = ("no reference model: the model has no run records naming its base model; "
                        "pass --reference BASE to enable compare mode and rewards")
    return ServedModels(policy=policy, reference=ref, beta=DEFAULT_BETA if beta is None else beta,
                        beta_known=beta is not None, info=info, sweep_dir=sweep_dir)


class AdapterView:
    """A LoRA model seen with its adapter on (the policy) or off (the reference: its base), so an
    adapter-only export serves policy and reference from ONE model in memory. Each call holds a lock
    shared by both views while it sets the adapter state, so concurrent requests never see the other's."""

    def __init__(self, peft_model: Any, enabled: bool, lock: Any) -> None:
        self.module = peft_model  # ``module``: what dpolab.scoring.logps unwraps to find the LM head
        self.enabled = enabled
        self.lock = lock

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from contextlib import nullcontext

        with self.lock, (nullcontext() if self.enabled else self.module.disable_adapter()):
            return getattr(self.module, method)(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("__call__", *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("generate", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # config, generation_config, parameters(), eval(), ...
        return getattr(self.__dict__["module"], name)


def load_adapter(model_id: str, source: str, reference: str | None, precision: str) -> tuple[LoadedModel, LoadedModel | None]:
    """(policy, reference) of an adapter-only export: its base with the adapter on, and, unless a
    separate ``reference`` is given, the same model with the adapter off (the DPO reference)."""
    import threading

    from dpolab.lora import load_adapter_model

    if precision != "fp32":
        raise DpolabError(f"{source}: an adapter-only export is served in fp32 only (got --precision {precision})")
    base = load_one(f"{model_id}-base", describe(source)[0]["base_model"], precision)
    peft_model = load_adapter_model(source, base.model).eval()
    lock = threading.RLock()
    policy = LoadedModel(id=model_id, source=source, model=AdapterView(peft_model, True, lock), tokenizer=base.tokenizer)
    if reference:
        return policy, None  # the caller loads the separate reference
    return policy, LoadedModel(id=f"{model_id}-reference", source=base.source,
                               model=AdapterView(peft_model, False, lock), tokenizer=base.tokenizer)


def answer_logps(loaded: LoadedModel, prompt_ids: list[int], answers: list[list[int]]) -> list[float]:
    """Summed log pi(answer | prompt) for each answer, one padded batch (answer-only, as in training)."""
    from dpolab.scoring.pairs import prompt_answer_logps

    # An answer that fills the context (prompt + max new tokens = context) is one position too long
    # once EOS is appended, and re-tokenized text can be longer than the ids generated: score what
    # fits, never index past the position embeddings (an IndexError after the whole answer).
    answers = [a[: max(0, loaded.context_length - len(prompt_ids))] for a in answers]
    return prompt_answer_logps(loaded.model, prompt_ids, answers, loaded.tokenizer.pad_token_id or 0)


def implicit_rewards(served: ServedModels, prompt_ids: list[int], answers: list[list[int]]) -> list[float] | None:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) of each answer, the quantity DPO
    trained (its chosen-minus-rejected margin is what the loss pushes up). None without a reference."""
    if served.reference is None:
        return None
    policy = answer_logps(served.policy, prompt_ids, answers)
    reference = answer_logps(served.reference, prompt_ids, answers)
    return [served.beta * (p - r) for p, r in zip(policy, reference, strict=True)]
