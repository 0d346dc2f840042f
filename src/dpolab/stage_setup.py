"""What every training stage resolves once at its start, and records: one truth per run.

SFT and DPO start the same way, so they share this one setup (no diverged copies):

    tokenizer  + the run's chat template bound to it (saved with the model: serve renders chats
                 the way training did)
    model      dropout off, fused GELU, in the resolved precision, on the resolved device
    data       tokenized pairs and their data key (the cache key, one function: data_cache_key)
    settings   device, dtype and why, batch layout, threads, hardware, template, data key,
               versions: :class:`ResolvedSettings`, written as the ``resolved`` block of run.json

Every later stage (evaluate, serve, export and its card, report, sweep, ``--resume``) reads the
block from the run folder (``dpolab.runs.RunFolder.resolved``) instead of re-deriving it from the
config, where ``auto`` could now mean something else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import dpolab
from dpolab.allocator import cap_kernel_cache
from dpolab.config import TrainConfig
from dpolab.data import DataReport, bind_template, default_cache_dir, prepare_data
from dpolab.data.templates import Formatter
from dpolab.errors import ConfigError
from dpolab.lora import quantization_config
from dpolab.model import (
    cpu_bf16_flags,
    cpu_model_name,
    disable_dropout,
    load_model,
    load_tokenizer,
    prepare_device,
    use_fused_gelu,
)
from dpolab.precision import MasterWeightAdamW, uses_bf16_weights
from dpolab.scoring.collate import PreferenceCollator, choose_packed
from dpolab.scoring.logps import batch_logps

logger = logging.getLogger(__name__)

# `dtype: auto` on a CPU: this environment variable, when set to bf16 or fp32, replaces the probe's
# verdict (CI runs the CLI-level tests once more with bf16, as an AMX CPU would choose).
AUTO_DTYPE_ENV = "DPOLAB_AUTO_DTYPE"
# bf16 must make the model's own training step this much faster to be chosen. The probe of one
# model on one quiet AMX CPU ranged 0.85-1.26x between fresh runs (tiny-gpt2's DPO step), and a CPU
# bf16 run holds about twice fp32's memory (oneDNN's per-shape kernels and buffers: `make demo`
# 2.9 against 1.3 GB) for no gain in wall time at that ratio; GPT-2 124M measures 1.55-1.75x.
BF16_MIN_SPEEDUP = 1.4
PROBE_TOKENS = 384  # tokens of real training data in each probe step (about one packed row)
PROBE_REPEATS = 2  # timed steps per precision, each on a batch of its own length


@dataclass
class ResolvedSettings:
    """How a stage actually runs: the ``resolved`` block of ``run.json`` (docs/run-folder.md)."""

    stage: str
    device: str
    dtype: str
    dtype_choice: dict[str, Any]  # how dtype was chosen: {"by": "asked"|"probe"|..., figures}
    batch_layout: str  # "packed" | "padded"
    threads: int
    hardware: dict[str, Any]
    model: str  # the starting model as loaded (absolute path for local folders)
    reference: dict[str, Any]  # {"model": ..., "role": ..., "key": ...}; DPO only
    chat_template: dict[str, Any]  # {"name": "hh"|"tokenizer"|path, "sha256": of the template text}
    dataset: str
    data_key: str
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageSetup:
    """What a stage trains with, after :func:`setup_stage`."""

    tokenizer: PreTrainedTokenizerBase
    formatter: Formatter
    model: PreTrainedModel
    datasets: DatasetDict
    data_report: DataReport
    settings: ResolvedSettings

    @property
    def packed(self) -> bool:
        return self.settings.batch_layout == "packed"

    @property
    def bf16_weights(self) -> bool:
        return uses_bf16_weights(self.settings.device, self.settings.dtype)


def hardware_info(device: str) -> dict[str, Any]:
    """The machine a run used: CPU model and bf16 instructions, or the GPU's name and memory."""
    info: dict[str, Any] = {"cpu": cpu_model_name(), "cpu_bf16": list(cpu_bf16_flags()),
                            "machine": platform.machine()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpus=torch.cuda.device_count())
    return info


def versions() -> dict[str, str]:
    import transformers

    return {"dpolab": dpolab.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def template_record(formatter: Formatter) -> dict[str, Any]:
    text = formatter.template
    return {"name": formatter.name, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16] if text else None}


def setup_stage(config: TrainConfig, recorded: dict[str, Any] | None = None) -> StageSetup:
    """Load and resolve everything a stage trains with, once.

    ``recorded``: the ``resolved`` block of the run being resumed; its dtype and batch layout are
    kept (a resumed run continues in the precision it started in, whatever ``auto`` says today).
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = prepare_device(config.device)
    if device == "cpu":
        # oneDNN keeps a bf16 kernel per batch shape: at most 128 of them. Set before the dtype
        # probe's bf16 steps, since oneDNN reads the setting once, on first use.
        cap_kernel_cache()
    tokenizer = load_tokenizer(config.model)
    formatter = bind_template(tokenizer, config.chat_template)  # saved with the model: serve renders chats the same way
    model = load_model(config.model, quantization_config=quantization_config(config, device))
    disable_dropout(model)
    use_fused_gelu(model)
    datasets, report, data_key = prepare_data(config, tokenizer)
    if recorded:
        packed = recorded["batch_layout"] == "packed"
        dtype, dtype_choice = recorded["dtype"], {**recorded["dtype_choice"], "resumed": True}
    else:
        packed = choose_packed(config.batch_layout, device, model)
        collate = PreferenceCollator(tokenizer.pad_token_id, packed=packed)
        dtype, dtype_choice = resolve_dtype(config, device, model, datasets["train"], collate)
    if uses_bf16_weights(device, dtype):
        model.to(torch.bfloat16)  # the reference pass scores with the same bf16 weights the policy starts from
    # Under torchrun / accelerate launch each process trains on its own GPU.
    target = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device
    if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit model is placed by from_pretrained
        model.to(target)
    settings = resolved_settings(config, device, dtype, dtype_choice, packed, formatter, data_key)
    return StageSetup(tokenizer, formatter, model, datasets, report, settings)


def resolved_settings(config: TrainConfig, device: str, dtype: str, dtype_choice: dict[str, Any], packed: bool,
                      formatter: Formatter, data_key: str) -> ResolvedSettings:
    """The record of how a stage runs (every engine writes the same block)."""
    settings = ResolvedSettings(
        stage=config.stage, device=device, dtype=dtype, dtype_choice=dtype_choice,
        batch_layout="packed" if packed else "padded", threads=torch.get_num_threads(),
        hardware=hardware_info(device), model=config.model, reference={},
        chat_template=template_record(formatter), dataset=config.dataset, data_key=data_key, versions=versions())
    logger.info("resolved: %s on %s, %s batches, %d threads (dtype %s)", dtype, device, settings.batch_layout,
                settings.threads, dtype_choice.get("by"))
    return settings


# -- dtype: auto --------------------------------------------------------------------------------

def resolve_dtype(config: TrainConfig, device: str, model: torch.nn.Module, train_set: Any,
                  collate: PreferenceCollator) -> tuple[str, dict[str, Any]]:
    """(dtype, how it was chosen) for ``config.dtype`` on ``device``.

    ``auto``: bf16 on a GPU that supports it. On a CPU with bf16 matmul instructions (AMX or
    AVX-512 BF16), bf16 only where it makes *this model's* training step clearly faster: a matmul
    of one fixed shape says little (a 64-wide model spends its step in the LM head, casts and
    elementwise work, where bf16 weights and their fp32 master copy cost more than they save), so
    :func:`probe_step` times the model's own training step on real training tokens in both
    precisions. Its verdict is cached per (CPU, threads, torch, architecture), so the same machine
    and model give the same choice run after run, every sweep trial included, and only the first
    run pays the probe (measured on a 2-core AMX CPU: 0.7 s for tiny-gpt2, 12 s for GPT-2 124M,
    about 2% of a first 124M run whose reference pass scores the bundled sample).
    """
    if config.dtype != "auto":
        return config.dtype, {"by": "asked"}
    if device == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ("bf16" if bf16 else "fp32"), {"by": "gpu", "bf16_supported": bf16}
    if device != "cpu":
        return "fp32", {"by": "device", "note": f"auto is fp32 on {device}"}
    flags = cpu_bf16_flags()
    forced = os.environ.get(AUTO_DTYPE_ENV, "").strip().lower()
    if forced:
        if forced not in ("bf16", "fp32"):
            raise ConfigError(f"{AUTO_DTYPE_ENV}={forced!r}: must be bf16 or fp32")
        return forced, {"by": f"environment ({AUTO_DTYPE_ENV}={forced})"}
    if not flags:
        return "fp32", {"by": "cpu", "note": "no bf16 matmul instructions (amx_bf16 / avx512_bf16)"}
    key = probe_key(model, collate.packed)
    path = Path(config.cache_dir or default_cache_dir()) / "dtype-probe" / f"{key}.json"
    if path.is_file():
        figures = json.loads(path.read_text())
        return figures["chosen"], {"by": "probe (cached)", **figures}
    fp32_s, bf16_s, tokens = probe_step(model, train_set, collate, config.logps_chunk_size)
    speedup = fp32_s / bf16_s
    chosen = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    figures = {"chosen": chosen, "fp32_ms": round(fp32_s * 1e3, 2), "bf16_ms": round(bf16_s * 1e3, 2),
               "bf16_speedup": round(speedup, 3), "min_speedup": BF16_MIN_SPEEDUP, "probe_tokens": tokens,
               "cpu_bf16": list(flags)}
    logger.info("dtype auto: this model's step on %d tokens %.1f ms fp32, %.1f ms bf16 (%.2fx) -> %s",
                tokens, fp32_s * 1e3, bf16_s * 1e3, speedup, chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(figures))
    os.replace(tmp, path)  # atomic: sweep workers may race here
    return chosen, {"by": "probe", **figures}


def probe_key(model: torch.nn.Module, packed: bool) -> str:
    """What the probe's verdict depends on: this CPU, its threads, torch, dpolab (whose bf16 step it
    times), the architecture."""
    parts = [cpu_model_name(), cpu_bf16_flags(), torch.get_num_threads(), torch.__version__, dpolab.__version__,
             model.config.to_json_string(use_diff=False), packed, PROBE_TOKENS, BF16_MIN_SPEEDUP]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def probe_step(model: torch.nn.Module, train_set: Any, collate: PreferenceCollator,
               chunk_size: int) -> tuple[float, float, int]:
    """Seconds of ``PROBE_REPEATS`` whole training steps (forward, backward, gradient clipping,
    AdamW) of ``model`` in fp32 and of a bf16 copy with its fp32 master weights (what a CPU bf16 run
    trains), on consecutive batches of real training sequences of about ``PROBE_TOKENS`` tokens.

    The whole step, not the forward alone: for a narrow model the master-weight update and the
    casts can cost more than bf16 matmuls save. Each timed step has a batch of a new length, as
    training does: oneDNN builds its bf16 kernels per matrix shape, a cost a probe repeating one
    shape would never see. One untimed step each first pays for what is built once. The learning
    rate is 0, so ``model`` is left as it was; the two precisions alternate batch by batch, so a
    noisy neighbour's burst slows both alike. Returns (fp32_s, bf16_s, timed tokens).
    """
    import copy
    import time

    batches, examples, tokens = [], [], 0
    for example in train_set.select(range(min(len(train_set), 256))):
        examples.append(example)
        tokens += len(example["prompt_ids"]) + len(example["chosen_ids"]) + len(example["rejected_ids"])
        if tokens >= PROBE_TOKENS:
            batches.append((collate(examples), tokens))
            examples, tokens = [], 0
            if len(batches) == PROBE_REPEATS + 1:
                break
    bf16_copy = copy.deepcopy(model).to(torch.bfloat16)
    candidates = [(model, torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)),
                  (bf16_copy, MasterWeightAdamW(bf16_copy.parameters(), lr=0.0, fused=True))]

    def step(candidate: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        batch_logps(candidate, batch, chunk_size).sum().backward()
        torch.nn.utils.clip_grad_norm_(candidate.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    was_training = model.training
    total = [0.0, 0.0]
    try:
        for candidate, optimizer in candidates:
            candidate.train()
            step(candidate, optimizer, batches[0][0])
        for batch, _ in batches[1:]:
            for i, (candidate, optimizer) in enumerate(candidates):
                total[i] += step(candidate, optimizer, batch)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return total[0], total[1], sum(n for _, n in batches[1:])
