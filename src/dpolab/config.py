"""Training configuration: one dataclass, loaded from YAML and ``--key value`` overrides.

Every field documents its type, default and meaning (TRL style). Unknown keys and bad values
fail at start with a one-line :class:`ConfigError` instead of deep inside training.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpolab.errors import ConfigError, first_line

# TRL 1.16 DPOTrainer's loss types, then dpolab's reference-free SimPO.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LOSS_TYPES = (*TRL_LOSS_TYPES, "simpo")
# Terms whose value never reads the reference: a loss made of these only skips the reference pass.
REFERENCE_FREE_LOSS_TYPES = frozenset({"simpo", "sft"})
# TRL 1.16: the f-DPO reparameterisation only holds where the loss reads the chosen-rejected difference.
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo"})
# Fields that hold one or several comma-separated values (a YAML list is joined): a string, so a
# sweep can search them as categorical choices and every table shows them as typed.
COMMA_FIELDS = ("loss_type", "loss_weights")
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
Engine = Literal["dpolab", "trl"]
Stage = Literal["dpo", "sft"]
BatchLayout = Literal["auto", "packed", "padded"]


# Loss terms computed over a whole batch (sft's token mean, aot's sorting): a batch split by
# max_tokens_per_batch would change them.
BATCH_LEVEL_LOSS_TYPES = frozenset({"sft", "aot", "aot_unpaired"})


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything one DPO training run needs. Field docs follow ``name (type, default): meaning``."""

    # -- what to train on -------------------------------------------------------------------
    stage: Stage = field(default="dpo", metadata=_doc(
        "(str, 'dpo'): 'dpo' (preference optimisation) or 'sft' (supervised fine-tuning on the chosen "
        "answers: the stage before DPO; what `dpolab sft` sets). Sweeps train whichever is set."))
    model: str = field(default="tiny-gpt2", metadata=_doc(
        "(str, 'tiny-gpt2'): Hub id (e.g. 'gpt2'), a local HF model folder, or a built-in name "
        "('tiny-gpt2', 'gpt2-124m-random'), or a dpolab run / sweep folder (its final / best model, e.g. an "
        "SFT run). It is also the frozen reference model unless ref_model is set."))
    dataset: str = field(default="hh-rlhf-sample", metadata=_doc(
        "(str, 'hh-rlhf-sample'): 'hh-rlhf-sample' (bundled real HH-RLHF harmless-base test split), a local "
        "*.jsonl / *.jsonl.gz / *.json / *.csv / *.parquet file or folder of them, a `save_to_disk` folder, "
        "a Hub dataset id, or a weighted mix 'a.jsonl:0.7,org/other:0.3'."))
    ref_model: str | None = field(default=None, metadata=_doc(
        "(str | None, None): the frozen DPO reference when it is not the starting model: Hub id, HF "
        "folder, built-in name, or a dpolab run / sweep folder (its final / best model)."))
    data_dir: str | None = field(default=None, metadata=_doc(
        "(str | None, None): subset of the Hub dataset, e.g. 'harmless-base' or 'helpful-base'."))
    data_files: str | None = field(default=None, metadata=_doc(
        "(str | None, None): comma-separated files inside the Hub dataset to load (its `data_files`)."))
    split: str = field(default="train", metadata=_doc(
        "(str, 'train'): split of a Hub / save_to_disk dataset to train on."))
    eval_split: str | None = field(default=None, metadata=_doc(
        "(str | None, None): held-out split of a Hub / save_to_disk dataset; None uses 'test' when it "
        "exists, else a seeded eval_fraction of the training split."))
    data_format: str = field(default="auto", metadata=_doc(
        "(str, 'auto'): row layout: 'auto' (detected from the columns), 'hh', 'explicit', "
        "'conversational' or 'implicit' (conversations sharing a prompt prefix)."))
    columns: str | None = field(default=None, metadata=_doc(
        "(str | None, None): column mapping for other layouts, e.g. 'prompt=question,chosen=good,rejected=bad'."))
    chat_template: str = field(default="auto", metadata=_doc(
        "(str, 'auto'): how conversations become text: 'auto' (the tokenizer's chat template when it has "
        "one, else 'hh'), 'hh' (\\n\\nHuman: / \\n\\nAssistant: text), 'tokenizer', or a PATH.jinja file."))
    dataset_num_proc: int | None = field(default=None, metadata=_doc(
        "(int | None, None): processes tokenizing the data; None uses all cores (up to 8) for large data."))
    eval_fraction: float = field(default=0.1, metadata=_doc(
        "(float, 0.1): held-out fraction when the source has a single split (seeded split)."))
    max_train_pairs: int | None = field(default=None, metadata=_doc(
        "(int | None, None): keep at most this many training pairs (after the seeded shuffle)."))
    max_eval_pairs: int | None = field(default=None, metadata=_doc(
        "(int | None, None): keep at most this many held-out pairs."))
    skip_bad_rows: bool = field(default=False, metadata=_doc(
        "(bool, False): count and drop malformed rows instead of failing on the first one."))
    max_length: int = field(default=512, metadata=_doc(
        "(int, 512): token budget of prompt + answer (EOS included)."))
    max_prompt_length: int = field(default=256, metadata=_doc(
        "(int, 256): the prompt is cut (oldest tokens first) down to this when a pair does not fit."))

    # -- the DPO objective ------------------------------------------------------------------
    loss_type: str = field(default="sigmoid", metadata=_doc(
        "(str, 'sigmoid'): the loss, or several comma-separated (a YAML list works too) summed with "
        "loss_weights. TRL 1.16 DPOTrainer's: 'sigmoid' (DPO, Eq. 7), 'hinge' (SLiC), 'ipo', 'exo_pair', "
        "'nca_pair', 'robust', 'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down', "
        "'discopop', 'sft' (chosen-token NLL), 'sigmoid_norm'; and 'simpo' (SimPO, reference-free; "
        "set beta 2.0, the authors' default). RPO is 'sigmoid,sft'; MPO-style mixes e.g. "
        "'sigmoid,bco_pair,sft'. A loss of 'simpo'/'sft' terms only skips the reference pass."))
    loss_weights: str | None = field(default=None, metadata=_doc(
        "(str | None, None): comma-separated weight of each loss_type term, e.g. '0.8,0.2,1.0'; None "
        "weighs every term 1.0 (TRL's loss_weights)."))
    beta: float = field(default=0.1, metadata=_doc(
        "(float, 0.1): strength of the KL constraint to the reference (IPO: its tau; SimPO: the reward "
        "scale, 2.0 in the paper)."))
    label_smoothing: float = field(default=0.0, metadata=_doc(
        "(float, 0.0): assumed label-flip probability eps, in [0, 0.5): conservative DPO (cDPO) for "
        "'sigmoid' (dpolab's; TRL 1.16 ignores it there), Robust DPO for 'robust', EXO's eps for "
        "'exo_pair' (needs > 0; 1e-3 in the paper), and as in TRL for 'aot', 'aot_unpaired', 'simpo'."))
    rpo_alpha: float = field(default=0.0, metadata=_doc(
        "(float, 0.0): shorthand for an 'sft' term of this weight (RPO: loss_type 'sigmoid,sft' with "
        "loss_weights '1,ALPHA'; OpenRLHF's nll_loss_coef): the chosen answers' mean per-token NLL. "
        "0 = none. Logged as 'nll_loss'."))
    ld_alpha: float | None = field(default=None, metadata=_doc(
        "(float | None, None): LD-DPO: an answer's log-prob counts its first min(|y_w|, |y_l|) tokens "
        "fully and the longer answer's remaining tokens times ld_alpha, in [0, 1] (1 = plain DPO, 0 = "
        "the tail ignored); None = off."))
    use_weighting: bool = field(default=False, metadata=_doc(
        "(bool, False): WPO: weigh each pair's loss by the policy's length-normalised probability of "
        "both answers (relative to its own sampling distribution); not with 'aot' / 'aot_unpaired'."))
    f_divergence_type: FDivergence = field(default="reverse_kl", metadata=_doc(
        "(str, 'reverse_kl'): f-DPO's divergence to the reference: 'reverse_kl' (DPO), 'forward_kl', "
        "'js_divergence' or 'alpha_divergence'; other than 'reverse_kl' only with sigmoid, sigmoid_norm, "
        "hinge, ipo, exo_pair, robust, discopop and sft terms."))
    f_alpha_divergence_coef: float = field(default=0.5, metadata=_doc(
        "(float, 0.5): the alpha of f_divergence_type 'alpha_divergence'."))
    discopop_tau: float = field(default=0.05, metadata=_doc(
        "(float, 0.05): DiscoPOP's temperature tau of the log-ratio modulation ('discopop'), > 0."))
    rdpo_alpha: float = field(default=0.0, metadata=_doc(
        "(float, 0.0): R-DPO (Park et al. 2024): alpha x (|y_w| - |y_l|) answer tokens added inside the "
        "'sigmoid' term, so the part of a preference its length difference explains no longer pushes "
        "the policy (alpha is per token: alpha x a typical length difference should be comparable to "
        "beta x a log-ratio margin). 0 = off."))
    simpo_gamma: float | None = field(default=None, metadata=_doc(
        "(float | None, None): SimPO's target reward margin gamma ('simpo'); None = beta / 2, the "
        "authors' gamma/beta = 0.5 (TRL's CPOConfig fixes 0.5 instead)."))

    # -- optimisation -----------------------------------------------------------------------
    learning_rate: float = field(default=5e-5, metadata=_doc("(float, 5e-5): peak AdamW learning rate."))
    per_device_train_batch_size: int = field(default=4, metadata=_doc(
        "(int, 4): preference pairs per device per micro-batch."))
    per_device_eval_batch_size: int = field(default=8, metadata=_doc("(int, 8): pairs per eval batch."))
    gradient_accumulation_steps: int = field(default=1, metadata=_doc(
        "(int, 1): micro-batches per optimizer step."))
    max_tokens_per_batch: int | None = field(default=None, metadata=_doc(
        "(int | None, None): token budget of one forward + backward. Each optimizer batch "
        "(per_device_train_batch_size x gradient_accumulation_steps pairs) is split into the fewest balanced "
        "micro-batches of at most this many tokens (chosen + rejected sequences), gradients accumulated over "
        "them: the same loss and gradients as the pair micro-batches, with forwards sized by tokens (larger "
        "matmuls, bounded memory) instead of by pairs. At least 2 x max_length. None = micro-batches of "
        "per_device_train_batch_size pairs. DPO on the dpolab engine only."))
    weight_decay: float = field(default=0.0, metadata=_doc("(float, 0.0): AdamW weight decay."))
    num_train_epochs: float = field(default=1.0, metadata=_doc("(float, 1.0): passes over the data."))
    max_steps: int = field(default=-1, metadata=_doc(
        "(int, -1): stop after this many optimizer steps (> 0; overrides epochs); -1 trains num_train_epochs."))
    warmup_ratio: float = field(default=0.0, metadata=_doc(
        "(float, 0.0): fraction of steps spent in linear warm-up, in [0, 1)."))
    lr_scheduler_type: str = field(default="linear", metadata=_doc(
        "(str, 'linear'): transformers scheduler name ('linear', 'cosine', 'constant', ...)."))
    max_grad_norm: float = field(default=1.0, metadata=_doc("(float, 1.0): gradient clipping norm."))
    seed: int = field(default=42, metadata=_doc("(int, 42): seeds data split, shuffling and training."))
    group_by_length: bool = field(default=True, metadata=_doc(
        "(bool, True): batch pairs of similar length together to cut padding; False = plain shuffle."))

    # -- logging, eval, checkpoints ---------------------------------------------------------
    logging_steps: int = field(default=10, metadata=_doc("(int, 10): optimizer steps between train logs."))
    eval_steps: int | None = field(default=None, metadata=_doc(
        "(int | None, None): optimizer steps between evaluations; None evaluates once per epoch."))
    sample_prompts: int = field(default=0, metadata=_doc(
        "(int, 0): at every evaluation the policy answers this many fixed held-out prompts (seeded); "
        "rows go to samples.jsonl and each tracker's table. 0 = off."))
    sample_max_new_tokens: int = field(default=48, metadata=_doc(
        "(int, 48): length limit of each sampled answer."))
    save_steps: int | None = field(default=None, metadata=_doc(
        "(int | None, None): optimizer steps between checkpoints (for --resume); None saves per epoch."))
    save_total_limit: int = field(default=2, metadata=_doc("(int, 2): checkpoints kept on disk."))
    report_to: list[str] = field(default_factory=list, metadata=_doc(
        "(list[str], []): extra trackers: 'wandb', 'mlflow', 'tensorboard', 'trackio'. The local run "
        "folder records are always written."))
    run_name: str | None = field(default=None, metadata=_doc(
        "(str | None, None): display name for trackers; defaults to the run folder name."))

    # -- memory: LoRA / QLoRA adapters (PEFT) -----------------------------------------------
    lora_r: int = field(default=0, metadata=_doc(
        "(int, 0): LoRA rank; > 0 trains low-rank adapters (PEFT) instead of every weight. 0 = full "
        "fine-tuning. The run's model/ holds the merged model, adapter/ the adapter alone."))
    lora_alpha: float = field(default=16.0, metadata=_doc(
        "(float, 16.0): LoRA scaling numerator: the update is (lora_alpha / lora_r) * B @ A."))
    lora_dropout: float = field(default=0.0, metadata=_doc(
        "(float, 0.0): dropout on the adapter's input, in [0, 1)."))
    lora_target_modules: list[str] = field(default_factory=list, metadata=_doc(
        "(list[str], []): module names to adapt; [] = the architecture's default (GPT-2: c_attn, c_proj, "
        "c_fc; Llama-style: q/k/v/o_proj, gate/up/down_proj; else every linear layer)."))
    load_in_4bit: bool = field(default=False, metadata=_doc(
        "(bool, False): QLoRA: load the base model in 4-bit NF4 (bitsandbytes, CUDA only) under the "
        "LoRA adapters; needs lora_r > 0 and a Hub or folder model."))

    # -- hardware ---------------------------------------------------------------------------
    engine: Engine = field(default="dpolab", metadata=_doc(
        "(str, 'dpolab'): 'dpolab' (fast engine) or 'trl' (TRL's DPOTrainer on the same data)."))
    device: str = field(default="auto", metadata=_doc("(str, 'auto'): 'auto', 'cuda', 'mps' or 'cpu'."))
    dtype: str = field(default="auto", metadata=_doc(
        "(str, 'auto'): 'auto' (bf16 on a bf16 GPU, or on a CPU with AMX/AVX-512 BF16 where a probe of this "
        "model's own training step finds bf16 at least 1.4x faster, verdict cached; else fp32; "
        "DPOLAB_AUTO_DTYPE=bf16|fp32 overrides the probe), 'bf16', 'fp16' or 'fp32'. What it resolved to is "
        "recorded in run.json. CPU bf16 trains bf16 weights with an fp32 master copy in the optimizer; GPU "
        "bf16 is autocast over fp32 weights."))
    num_threads: int | None = field(default=None, metadata=_doc(
        "(int | None, None): CPU threads for torch; None keeps torch's default."))
    gradient_checkpointing: bool = field(default=False, metadata=_doc(
        "(bool, False): recompute each block's activations in backward instead of storing them: less "
        "memory, about a third more compute, same loss and gradients."))
    batch_layout: BatchLayout = field(default="auto", metadata=_doc(
        "(str, 'auto'): 'packed' (a batch's sequences end to end, no padding: same log-probs, less compute; "
        "the model is checked to keep packed sequences apart), 'padded' (each sequence padded to the "
        "longest), or 'auto' (packed on CPU when the model passes the check, padded on GPUs, where "
        "packing is not yet measured). dpolab engine only."))
    compile: bool = field(default=False, metadata=_doc(
        "(bool, False): torch.compile the model (Trainer's torch_compile; inductor, which needs a C++ compiler on "
        "CPU). Batch lengths are rounded up to a multiple of 64 so a few graphs cover every step; the first "
        "steps of each new shape pay the compilation. Same losses as eager to float rounding."))
    logps_chunk_size: int = field(default=128, metadata=_doc(
        "(int, 128): answer tokens per LM-head chunk; bounds the (chunk, vocab) logits in memory."))
    cache_dir: str | None = field(default=None, metadata=_doc(
        "(str | None, None): tokenized-data and reference log-prob cache; default $DPOLAB_CACHE or "
        "~/.cache/dpolab."))

    def __post_init__(self) -> None:
        for name in COMMA_FIELDS:
            setattr(self, name, comma_joined(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        positive = ["max_length", "max_prompt_length", "per_device_train_batch_size",
                    "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                    "logps_chunk_size", "sample_max_new_tokens"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")
        if self.rpo_alpha < 0:
            raise ConfigError(f"rpo_alpha must be >= 0, got {self.rpo_alpha!r}")
        self._validate_loss()
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_steps == 0 or self.max_steps < -1:  # Trainer would take one step at learning rate 0
            raise ConfigError(f"max_steps must be > 0, or -1 to train num_train_epochs, got {self.max_steps!r}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError("set num_train_epochs > 0 or max_steps > 0")
        if self.data_format not in ("auto", "hh", "explicit", "conversational", "implicit"):
            raise ConfigError(f"data_format must be auto, hh, explicit, conversational or implicit, "
                              f"got {self.data_format!r}")
        if self.sample_prompts < 0:
            raise ConfigError(f"sample_prompts must be >= 0, got {self.sample_prompts!r}")
        if self.max_tokens_per_batch is not None:
            if self.stage != "dpo" or self.engine != "dpolab":
                raise ConfigError("max_tokens_per_batch runs on stage 'dpo', engine 'dpolab' only")
            batch_level = sorted({name for name, _ in self.loss_terms} & BATCH_LEVEL_LOSS_TYPES)
            if batch_level:
                raise ConfigError(f"max_tokens_per_batch splits a batch into pieces, but loss term(s) {batch_level} are "
                                  "computed over a whole batch (rpo_alpha is an 'sft' term): drop one of them")
            if self.max_tokens_per_batch < 2 * self.max_length:
                raise ConfigError(f"max_tokens_per_batch ({self.max_tokens_per_batch}) must be at least 2 x max_length "
                                  f"({2 * self.max_length}): a pair's chosen and rejected sequences go in one micro-batch")
        for name in ("eval_steps", "save_steps", "max_train_pairs", "max_eval_pairs", "dataset_num_proc"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0 or null, got {value!r}")
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r!r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.load_in_4bit and not self.lora_r:
            raise ConfigError("load_in_4bit (QLoRA) trains adapters on a frozen 4-bit base: set lora_r > 0 too")
        if self.stage == "sft" and self.engine == "trl":
            raise ConfigError("stage 'sft' runs on engine 'dpolab' only")
        if self.lora_r and self.engine == "trl":
            raise ConfigError("LoRA (lora_r > 0) runs on engine 'dpolab' only")
        if self.batch_layout == "packed" and self.engine == "trl":
            raise ConfigError("batch_layout 'packed' runs on engine 'dpolab' only (TRL pads its batches)")
        if self.device not in ("auto", "cuda", "mps", "cpu"):
            raise ConfigError(f"device must be auto, cuda, mps or cpu, got {self.device!r}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        known_trackers = {"wandb", "mlflow", "tensorboard", "trackio"}
        for tracker in self.report_to:
            if tracker not in known_trackers:
                raise ConfigError(f"report_to: unknown tracker {tracker!r} (known: {sorted(known_trackers)})")

    def _validate_loss(self) -> None:
        names = self.loss_type.split(",") if self.loss_type else []
        for name in names or [""]:
            if name not in LOSS_TYPES:
                raise ConfigError(f"loss_type: unknown loss {name!r}{did_you_mean(name, list(LOSS_TYPES))} "
                                  f"(known: {', '.join(LOSS_TYPES)})")
        if self.loss_weights is not None:
            try:
                weights = [float(w) for w in self.loss_weights.split(",")]
            except ValueError:
                raise ConfigError(f"loss_weights must be comma-separated numbers, got {self.loss_weights!r}") from None
            if len(weights) != len(names):
                raise ConfigError(f"loss_weights has {len(weights)} weights for {len(names)} loss types "
                                  f"({self.loss_type!r})")
        if self.rpo_alpha and "sft" in names:
            raise ConfigError("rpo_alpha is a shorthand for an 'sft' term: give it in loss_type/loss_weights "
                              "or as rpo_alpha, not both")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and not LABEL_SMOOTHING_LOSS_TYPES & set(names):
            raise ConfigError(f"label_smoothing needs a loss that reads it: {', '.join(sorted(LABEL_SMOOTHING_LOSS_TYPES))}")
        if "exo_pair" in names and not self.label_smoothing:
            raise ConfigError("loss_type 'exo_pair' needs label_smoothing > 0 (EXO's eps; 1e-3 in the paper)")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ConfigError(f"ld_alpha must be in [0, 1] or null, got {self.ld_alpha!r}")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(names):
            raise ConfigError("use_weighting (WPO) does not apply to 'aot' / 'aot_unpaired': they sort the pairs")
        if self.f_divergence_type != "reverse_kl" and not set(names) <= F_DIVERGENCE_LOSS_TYPES:
            raise ConfigError(f"f_divergence_type {self.f_divergence_type!r} needs loss types among "
                              f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))}; got {self.loss_type!r}")
        if self.discopop_tau <= 0:
            raise ConfigError(f"discopop_tau must be > 0, got {self.discopop_tau!r}")
        if self.rdpo_alpha < 0:
            raise ConfigError(f"rdpo_alpha must be >= 0, got {self.rdpo_alpha!r}")
        if self.rdpo_alpha and "sigmoid" not in names:
            raise ConfigError("rdpo_alpha (R-DPO) adds its length term to the 'sigmoid' loss: loss_type needs 'sigmoid'")
        if self.simpo_gamma is not None and self.simpo_gamma < 0:
            raise ConfigError(f"simpo_gamma must be >= 0 or null, got {self.simpo_gamma!r}")

    @property
    def loss_terms(self) -> list[tuple[str, float]]:
        """``[(loss type, weight), ...]``: loss_type with loss_weights, plus rpo_alpha's 'sft' term."""
        names = self.loss_type.split(",")
        weights = [float(w) for w in self.loss_weights.split(",")] if self.loss_weights else [1.0] * len(names)
        terms = list(zip(names, weights, strict=True))
        return [*terms, ("sft", self.rpo_alpha)] if self.rpo_alpha else terms

    @property
    def reference_free(self) -> bool:
        """Whether no loss term reads the reference (SimPO, SFT): the reference pass is skipped."""
        return all(name in REFERENCE_FREE_LOSS_TYPES for name, _ in self.loss_terms)

    def loss_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`dpolab.scoring.loss.pair_losses` this config sets."""
        return {"loss_terms": self.loss_terms, "beta": self.beta, "label_smoothing": self.label_smoothing,
                "ld_alpha": self.ld_alpha, "use_weighting": self.use_weighting,
                "f_divergence_type": self.f_divergence_type, "f_alpha_divergence_coef": self.f_alpha_divergence_coef,
                "discopop_tau": self.discopop_tau, "rdpo_alpha": self.rdpo_alpha,
                "simpo_gamma": self.beta / 2 if self.simpo_gamma is None else self.simpo_gamma}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build a config from YAML-typed values (a config file, a sweep, a run's config.yaml),
        checking each against its field's type. Unknown keys fail."""
        return cls(**cls.typed_values(values, source))

    @classmethod
    def typed_values(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
        """``values`` with each checked against its field's type (``source`` names them in errors)."""
        cls.check_keys(values, source)
        hints = typing.get_type_hints(cls)
        values = {key: comma_joined(value) if key in COMMA_FIELDS else value for key, value in values.items()}
        return {key: _check_type(key, value, hints[key], source) for key, value in values.items()}

    @classmethod
    def check_keys(cls, values: dict[str, Any], source: str) -> None:
        """Fail on the first key that is not a field, suggesting the closest field name."""
        known = cls.field_names()
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r}{did_you_mean(key, known)}")


def comma_joined(value: Any) -> Any:
    """A YAML / Python list of a comma field as its one-string form (``[sigmoid, sft]`` -> 'sigmoid,sft'),
    spaces dropped; any other value as it is (the type check names a wrong one)."""
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        value = ",".join(str(v) for v in value)
    return value.replace(" ", "") if isinstance(value, str) else value


def did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(key: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` if YAML typed it as field ``key`` declares (an int is a float; a bool is no number),
    else a one-line :class:`ConfigError`. Command-line values are converted by argparse instead
    (:func:`dpolab.train_options.config_options` builds the parser from these fields)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_type(key, value, next(a for a in args if a is not type(None)), source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # `report_to: wandb,mlflow` reads as well as a YAML list
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {key} must be a list of strings, got {value!r}")
        return value
    if hint is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads `5e-5` (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    accepted = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}[hint]
    if isinstance(value, bool) is not (hint is bool) or not isinstance(value, accepted):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) + overrides (already typed, e.g. by argparse; they win) -> validated
    :class:`TrainConfig`."""
    values = TrainConfig.typed_values(read_yaml(path), str(path)) if path else {}
    values.update(TrainConfig.typed_values(overrides or {}, "command line"))
    return TrainConfig(**values)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
