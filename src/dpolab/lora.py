"""LoRA and QLoRA through PEFT: train small low-rank adapters instead of every weight.

The reference log-probs are precomputed from the base model before the adapters are added (an
adapter starts as an exact no-op: LoRA's B matrix is zero), so training needs no adapter
switching and holds one model. At the end the run folder gets both forms: ``model/`` with the
adapter merged in (a plain Hugging Face model, what every later stage loads) and ``adapter/``
(the PEFT adapter alone, a few MB, for ``dpolab export --adapter-only``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dpolab.config import TrainConfig
from dpolab.errors import ConfigError, first_line
from dpolab.runs import RunFolder, give_default_modes

logger = logging.getLogger(__name__)

# Every projection of attention and MLP (the QLoRA paper's finding: adapting all linear layers,
# not just q/v, is what matches full fine-tuning). Keyed by ``config.model_type``.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj matches both attn.c_proj and mlp.c_proj
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
}
ALL_LINEAR = "all-linear"  # PEFT's own fallback: every linear layer except the output head


def uses_lora(config: TrainConfig) -> bool:
    return config.lora_r > 0


def target_modules(config: TrainConfig, model_type: str) -> list[str] | str:
    """The configured modules, else this architecture's default, else PEFT's all-linear."""
    return config.lora_target_modules or DEFAULT_TARGET_MODULES.get(model_type, ALL_LINEAR)


def quantization_config(config: TrainConfig, device: str) -> Any:
    """``BitsAndBytesConfig`` for a 4-bit (NF4) base model, or None without ``load_in_4bit``.

    bitsandbytes' 4-bit kernels need a CUDA GPU: anywhere else this is a one-line ConfigError
    before any work, not a crash deep inside ``from_pretrained``.
    """
    if not config.load_in_4bit:
        return None
    if device != "cuda":
        raise ConfigError(f"load_in_4bit (QLoRA) needs a CUDA GPU with bitsandbytes; this run's device is "
                          f"{device!r}. Use plain LoRA (--lora-r) on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def add_adapters(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT LoRA model whose adapters are the only trainable parameters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers.pytorch_utils import Conv1D

    targets = target_modules(config, model.config.model_type)
    if config.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    # GPT-2's projections are Conv1D, whose weight is stored (in, out): PEFT must know to transpose.
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. a target module name that the model does not have
        raise ConfigError(f"lora_target_modules {targets}: {first_line(exc)}") from None
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d on %s: %d trainable parameters of %d (%.2f%%)", config.lora_r, targets,
                trainable, total, 100 * trainable / total)
    return peft_model


def is_peft_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_final_model(trainer: Any, run: RunFolder, base_model: str) -> None:
    """The run's final model as a plain HF model in ``model/``; a LoRA run also saves ``adapter/``.
    Called on every process (see :func:`dpolab.lifecycle.fit`).

    The adapter's ``base_model_name_or_path`` is the run's base (a built-in name, Hub id or
    folder) so an adapter-only export can say what it applies to.
    """
    model = trainer.model
    if not is_peft_model(model):
        trainer.save_model(str(run.model_dir))  # on every rank: a collective under FSDP
        if trainer.is_world_process_zero():
            give_default_modes(run.model_dir)
        return
    if not trainer.is_world_process_zero():
        return
    model.peft_config["default"].base_model_name_or_path = base_model
    # save_embedding_layers=False: LoRA never touches the embeddings (and a built-in base has no
    # Hub config for PEFT to check that against).
    model.save_pretrained(run.adapter_dir, save_embedding_layers=False)
    merged_copy(model).save_pretrained(run.model_dir)
    for folder in (run.adapter_dir, run.model_dir):
        give_default_modes(folder)


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapter's low-rank update added into the base weights."""
    import copy

    return copy.deepcopy(model).merge_and_unload()


def load_adapter_model(adapter_dir: str | Path, base_model: torch.nn.Module) -> torch.nn.Module:
    """``base_model`` with the PEFT adapter saved in ``adapter_dir`` on top (inference mode)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir))


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter folder names (``base_model_name_or_path``)."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
