"""Faster CPU generation: load a trained model in fp32, bf16 or int8 (weight-only quantised) precision.

Decoding one token at batch 1 reads every weight once, so on a CPU its time is set by memory
bandwidth, not FLOPs: fp32 GPT-2 124M moves ~500 MB per token, bf16 half that, int8 a quarter.

* ``bf16``: weights and activations in bfloat16 (CPUs with AVX512-BF16/AMX run these matmuls natively).
* ``int8``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``: int8 weights with a
  per-row scale, activations quantised on the fly. GPT-2's attention/MLP projections are
  transformers' ``Conv1D`` (weight stored transposed), which ``quantize_dynamic`` ignores, so they
  are converted to ``nn.Linear`` first; the LM head (tied to the input embedding) gets its own
  copy so it can be quantised while the embedding lookup stays fp32.

All three also run GPT-2's GELU as one fused kernel (:func:`dpolab.model.use_fused_gelu`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from dpolab.errors import ConfigError
from dpolab.hh import HUMAN, SAMPLING
from dpolab.model import load_frozen

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")


def load_for_generation(model_dir: str | Path, precision: Precision = "fp32") -> nn.Module:
    """A model ready for ``.generate`` on CPU in the given precision (eval mode, no dropout).

    ``model_dir`` is anything :func:`dpolab.model.load_model` takes: a run's ``model/`` folder,
    a Hub id or a built-in name.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    model = load_frozen(str(model_dir), "cpu", torch.bfloat16 if precision == "bf16" else torch.float32)
    return quantize_int8(model) if precision == "int8" else model


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace transformers' ``Conv1D`` (y = x @ W + b, W: (in, out)) by the equivalent ``nn.Linear``
    (W.T: (out, in)) so PyTorch's quantisation sees it. Returns the number replaced."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = nn.Linear(n_in, n_out, bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, name, linear)
                replaced += 1
    return replaced


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of every linear layer, LM head included (the biggest one)."""
    conv1d_to_linear(model)
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        # Untie: the quantised head must not replace the embedding table used for lookups.
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        with torch.no_grad():
            untied.weight.copy_(head.weight)
        model.set_output_embeddings(untied)
        model.config.tie_word_embeddings = False
    # Per-output-channel scales: one outlier row must not cost every other row its precision.
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)


def cut_answer(text: str) -> str:
    """The assistant's turn only: a model that goes on to write the next human turn is cut there."""
    return text.split(HUMAN, 1)[0].strip()


@torch.no_grad()
def sample_answer(model: nn.Module, tokenizer, prompt_ids: list[int], seed: int, max_new_tokens: int = 64,
                  temperature: float = SAMPLING["temperature"], top_p: float = SAMPLING["top_p"]) -> str:
    """One seeded sampled answer to a tokenized prompt, cut at the next human turn.

    The same ``seed`` gives the same answer from the same model, so two models' answers differ only
    because the models do. Sampling runs under a forked RNG: the caller's random stream (a
    training run's) is left exactly where it was.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id)  # (1, T + new)
    return cut_answer(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))


@torch.no_grad()
def answer_nll(model: nn.Module, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of the answer tokens of ONE sequence.

    Goes through the model's own LM head (full logits), so it works for quantised heads too.
    input_ids, answer_mask: (1, T).
    """
    logits = model(input_ids=input_ids, use_cache=False).logits.float()  # (1, T, V)
    logps = logits[:, :-1].log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)  # (1, T-1)
    mask = answer_mask[:, 1:].bool()
    return float(-logps[mask].sum()), int(mask.sum())
