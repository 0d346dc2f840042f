"""Models and tokenizer: built-in GPT-2-architecture models, local folders and Hub ids.

No GPT-2 weights exist offline, so the built-ins are GPT-2 architectures with a *seeded* random
init and the real GPT-2 tokenizer (shipped as package data). ``gpt2`` or any Hub id goes
through the exact same ``from_pretrained`` path when the network is there.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from dpolab.errors import ConfigError, first_line
from dpolab.runs import RunFolder, SweepFolder, resolve_model_dir

logger = logging.getLogger(__name__)

BUILTIN_SEED = 0  # the built-ins are the same weights on every machine, every run
BUILTIN_MODELS: dict[str, dict[str, int]] = {
    # 3.4M parameters, 3.2M of them the (tied) 50,257 x 64 embedding: the LM head dominates
    # its compute, which makes it a sharp test of answer-only log-probs.
    "tiny-gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024},
    # The GPT-2 124M architecture: same compute cost as real GPT-2, for speed benchmarks.
    "gpt2-124m-random": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
}


def tokenizer_dir() -> Path:
    """Folder of the bundled real GPT-2 tokenizer (vocab 50,257; <|endoftext|> = 50256)."""
    return Path(str(resources.files("dpolab") / "resources" / "gpt2-tokenizer"))


# What from_pretrained raises for a folder it cannot read: missing files, torn or corrupt weights.
UNREADABLE = (OSError, ValueError, SafetensorError)


def model_source(model_name: str) -> str:
    """What ``from_pretrained`` should read: a dpolab run or sweep folder means its final (best) model,
    so ``--model runs/sft`` starts from an SFT run; anything else is returned as given."""
    if RunFolder.is_run(model_name) or SweepFolder.is_sweep(model_name):
        return str(resolve_model_dir(model_name))
    return model_name


def check_source(model_name: str) -> dict[str, Any]:
    """Fail at once, in one line, for a model that cannot load; return ``from_pretrained`` kwargs.

    A folder must hold ``config.json``. Anything else must be a Hub id that is in the local cache
    (with ``HF_HUB_OFFLINE``) or that one quick request finds; without this a typo (``--model 123``)
    spends a minute in the Hub client's network retries before a traceback.
    """
    if model_name in BUILTIN_MODELS:
        return {}
    path = Path(model_source(model_name))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: {model_name} is not a Hugging Face model folder (no config.json)")
        return {}
    return {"local_files_only": True} if _hub_unreachable_but_cached(model_name) else {}


@functools.cache
def _hub_unreachable_but_cached(model_name: str) -> bool:
    """Raise ConfigError for a Hub id that cannot load; True when only the local cache can serve it."""
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    unknown = (f"model {model_name!r}: no such local folder, not a built-in ({', '.join(BUILTIN_MODELS)})")
    try:
        cached = isinstance(try_to_load_from_cache(model_name, "config.json"), str)
    except HFValidationError:
        raise ConfigError(f"{unknown}, and not a valid Hub id") from None
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ENV_VARS_TRUE_VALUES:
        if not cached:
            raise ConfigError(f"{unknown}, and not in the Hub cache (HF_HUB_OFFLINE is set)")
        return False
    try:
        model_info(model_name, timeout=10)
    except RepositoryNotFoundError:
        raise ConfigError(f"{unknown}, and not a model on the Hub (or a private one: log in)") from None
    except Exception as exc:  # no network, proxy, DNS: the Hub client's errors have no common base
        if not cached:
            raise ConfigError(f"{unknown}, and the Hub is unreachable ({first_line(exc, with_type=True)})") from None
        logger.warning("the Hub is unreachable; loading %s from the local cache", model_name)
        return True
    return False


def load_tokenizer(model_name: str):
    """Tokenizer for ``model_name``. GPT-2 has no pad token: reuse EOS as pad rather than growing
    the vocabulary (padding positions are masked out everywhere, so the id never matters)."""
    if model_name in BUILTIN_MODELS:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    else:
        kwargs = check_source(model_name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_source(model_name), **kwargs)
        except UNREADABLE as exc:
            raise ConfigError(f"model {model_name}: cannot load its tokenizer ({first_line(exc, with_type=True)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_builtin(name: str) -> GPT2LMHeadModel:
    """A GPT-2-architecture model with a seeded random init, identical on every call."""
    config = GPT2Config(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
                        **BUILTIN_MODELS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_SEED)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = 50256
    return model


def load_model(model_name: str, dtype: torch.dtype | None = None, quantization_config: Any = None) -> PreTrainedModel:
    """A causal LM from a built-in name, a local HF folder, a dpolab run / sweep folder or a Hub id.

    ``quantization_config``: a ``BitsAndBytesConfig`` (QLoRA's 4-bit base), Hub or folder models only.
    """
    if model_name in BUILTIN_MODELS:
        if quantization_config is not None:
            raise ConfigError(f"model: the built-in {model_name!r} cannot be loaded quantized; "
                              "use a Hub id or a model folder with load_in_4bit")
        model = build_builtin(model_name)
        return model.to(dtype) if dtype is not None else model
    kwargs = check_source(model_name)
    if quantization_config is not None:
        # Quantized while loading, onto this process's GPU (bitsandbytes needs CUDA).
        kwargs.update(quantization_config=quantization_config,
                      device_map={"": int(os.environ.get("LOCAL_RANK", "0"))})
    try:
        model = AutoModelForCausalLM.from_pretrained(model_source(model_name), dtype=dtype or torch.float32,
                                                     **kwargs)
    except UNREADABLE as exc:  # a truncated safetensors file, a torn config.json, missing weights
        raise ConfigError(f"model {model_name}: cannot load it ({first_line(exc, with_type=True)})") from None
    # Pad = EOS, as in load_tokenizer (GPT-2 ships without a pad token).
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def load_frozen(model_name: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A model that only scores (a reference, a policy under evaluation): loaded as training loads
    it (dropout off, fused GELU), in ``dtype``, on ``device``, in eval mode."""
    model = load_model(model_name)
    disable_dropout(model)
    use_fused_gelu(model)
    return model.to(device=device, dtype=dtype).eval()


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares the policy with its own frozen start: dropout noise would make the first step's
    loss differ from ln 2 and add variance to every log-ratio (TRL does the same by default)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def use_fused_gelu(model: torch.nn.Module) -> int:
    """Run GPT-2's tanh-GELU (``gelu_new``) as one fused kernel instead of ~7 elementwise Python ops.

    Same formula (``F.gelu(approximate='tanh')``), equal to fp32 rounding; on CPU the Python version
    was ~25% of a GPT-2 124M training step (benchmarks/profile_step.py). Only the module instances
    change: the saved config keeps ``gelu_new``. Returns the number of activations swapped.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def resolve_device(device: str = "auto") -> str:
    """'auto' -> the best device torch has; a named one must be there (else one line, not torch's
    AssertionError from deep inside the first ``.to(device)``)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "it was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"device {device!r}: torch {torch.__version__} cannot use it ({why}); "
                          "use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device 'mps': not available to torch {torch.__version__}; use --device cpu or auto")
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def prepare_device(device: str = "auto") -> str:
    """:func:`resolve_device`, then set this process up for that device; returns its name.

    On CUDA, ``scaled_dot_product_attention`` is kept off its cuDNN backend. cuDNN attention builds
    an execution plan for every new (batch, length) shape, and preference batches are padded to
    their longest pair, so almost every step brings a new length: profiled on an H200 (GPT-2 124M,
    batch 8, bf16; BENCHMARKS.md) plan building took 25-35 ms of host time per attention call, about
    0.7 s a step against 18 ms of GPU work. The flash and memory-efficient kernels are compiled ahead
    of time for any length. The switch is process-wide (torch's SDPA flags are global, so a scoped
    ``sdpa_kernel`` would race between threads) and set only for a CUDA device.
    """
    device = resolve_device(device)
    if device.startswith("cuda") and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        logger.info("attention: cuDNN SDPA backend off (it re-plans for every new sequence length)")
    return device


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's bf16 matmul instruction sets from /proc/cpuinfo (``amx_bf16``, ``avx512_bf16``)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no probe, fp32
        return ()
    return tuple(f for f in ("amx_bf16", "avx512_bf16") if f in flags)


@functools.cache
def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: the key of the reference log-prob cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
