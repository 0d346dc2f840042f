"""Batches of preference pairs, padded or packed without padding.

A batch of HH-RLHF pairs padded to its longest sequence is a third padding at 2 pairs and more
than half at 8 (bundled sample, max_length 512, random order): the transformer body spends that
share of its matmuls on tokens nobody scores. The *packed* layout puts the 2B sequences end to end
in a few rows instead, each sequence's position ids restarting at 0. With no attention mask,
transformers reads those restarts as sequence boundaries (``masking_utils.find_packed_sequence_indices``)
and builds a block-diagonal causal mask, so no token sees another sequence and every log-prob is
the padded layout's up to float rounding (a sequence's offset in its row changes how attention
groups its sums: ~1e-7 relative; tests/dpo/test_collate.py). That this holds for a given model is
checked, not assumed: :func:`packs_correctly`.

Both layouts carry the same keys, so :func:`dpolab.scoring.logps.batch_logps` reads either:

* ``input_ids`` (R, L), ``answer_mask`` (R, L): 1 at the answer tokens we score;
* ``sequence_index`` (R, L): which of the S sequences each position holds, -1 at padding;
* ``answer_lengths`` (S,): answer tokens per sequence (IPO's length normalisation, SFT's mean);
* padded (R = S): ``attention_mask`` (S, T); packed: ``position_ids`` (R, L) and no mask.

Sequences 0..B-1 are the chosen answers, B..2B-1 the rejected ones (one forward pass for both,
see :func:`dpolab.scoring.logps.concatenated_forward`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from dpolab.errors import ConfigError

logger = logging.getLogger(__name__)

# Tokens per packed row (on average: rows are balanced). Attention over a row with a dense block
# mask costs (row length)^2 however the row is split into sequences: for 8 HH pairs, one row of
# all 16 sequences makes attention slower than padding, rows of ~500 tokens 0.4x of it
# (benchmarks/packed_attention.py).
PACKED_ROW_TOKENS = 512
# Under torch.compile batch lengths are rounded up to a multiple of this, so a few shapes (graphs)
# cover every step instead of one per batch length.
COMPILE_LENGTH_BUCKET = 64


@dataclass
class PreferenceCollator:
    """Collates tokenized pairs into one batch of 2B sequences (chosen first, then rejected).

    Each example has ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (already truncated to the
    budget, EOS included) and optionally ``ref_chosen_logps`` / ``ref_rejected_logps`` (and any
    other ``ref_*`` per-pair number, e.g. LD-DPO's ``ref_chosen_tail_logps``), passed through as (B,).
    ``answer_keys=("chosen_ids",)`` gives SFT's batch of B prompt + chosen sequences instead.
    ``packed=True`` lays them out without padding (module docstring). ``pair_keys`` names per-pair
    numbers passed through as (B,) tensors (the answers' lengths, for the length-controlled metrics).
    """

    pad_token_id: int
    answer_keys: tuple[str, ...] = ("chosen_ids", "rejected_ids")
    packed: bool = False
    row_tokens: int = PACKED_ROW_TOKENS  # packed rows' mean length: ceil(tokens / row_tokens) rows
    pair_keys: tuple[str, ...] = ()
    # Token budget of one micro-batch (TrainConfig.max_tokens_per_batch): the examples are split into
    # as few balanced micro-batches as keep each within it, returned as {"micro_batches": [batch, ...]}.
    max_tokens: int | None = None
    # Row length rounded up to a multiple of this (torch.compile: a few shapes instead of one per batch).
    pad_to_multiple_of: int = 1

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.max_tokens is None:
            return self.collate(examples)
        sizes = [sum(len(e["prompt_ids"]) + len(e[key]) for key in self.answer_keys) for e in examples]
        return {"micro_batches": [self.collate([examples[i] for i in group])
                                  for group in token_budget_groups(sizes, self.max_tokens)]}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One batch of the examples' sequences, in the layout the module docstring describes."""
        sequences, answer_masks = [], []
        for answer_key in self.answer_keys:
            for example in examples:
                prompt, answer = list(example["prompt_ids"]), list(example[answer_key])
                sequences.append(torch.tensor(prompt + answer, dtype=torch.long))
                answer_masks.append(torch.tensor([0] * len(prompt) + [1] * len(answer), dtype=torch.long))
        if self.packed:
            batch = pack(sequences, answer_masks, self.pad_token_id, self.row_tokens, self.pad_to_multiple_of)
        else:
            batch = pad(sequences, answer_masks, self.pad_token_id, self.pad_to_multiple_of)
        batch["answer_lengths"] = torch.stack([mask.sum() for mask in answer_masks])  # (S,)
        for key in examples[0]:
            if key.startswith("ref_"):  # ref_chosen_logps, ref_rejected_logps (+ LD-DPO's ref_*_tail_logps)
                batch[key] = torch.tensor([e[key] for e in examples])  # (B,)
        for key in self.pair_keys:
            batch[key] = torch.tensor([e[key] for e in examples])  # (B,)
        return batch


def pad(sequences: list[torch.Tensor], answer_masks: list[torch.Tensor], pad_token_id: int,
        pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """One right-padded row per sequence: (S, T) with T the longest sequence, rounded up to a
    multiple of ``pad_to_multiple_of``."""
    index = [torch.full_like(s, i) for i, s in enumerate(sequences)]
    batch = {
        "input_ids": pad_sequence(sequences, batch_first=True, padding_value=pad_token_id),  # (S, T)
        "attention_mask": pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True),  # (S, T)
        "answer_mask": pad_sequence(answer_masks, batch_first=True),  # (S, T)
        "sequence_index": pad_sequence(index, batch_first=True, padding_value=-1),  # (S, T)
    }
    extra = -batch["input_ids"].shape[1] % pad_to_multiple_of
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "answer_mask": 0, "sequence_index": -1}
    return {key: torch.nn.functional.pad(value, (0, extra), value=fill[key]) for key, value in batch.items()}


def pack(sequences: list[torch.Tensor], answer_masks: list[torch.Tensor], pad_token_id: int,
         row_tokens: int = PACKED_ROW_TOKENS, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Sequences end to end in ceil(tokens / max(``row_tokens``, longest sequence)) rows of about
    equal length: longest first, each into the shortest row so far, so the rows end nearly together
    and little filler is needed (the rows only hold positions; ``sequence_index`` says whose they are).

    Every row ends with at least one filler token, never scored: rows then share one length, and
    the last column is never the pad id, which would make transformers warn that the input looks
    padded without an attention mask. ``pad_to_multiple_of`` rounds that length up.
    """
    lengths = [len(s) for s in sequences]
    target = max(row_tokens, *lengths)  # no row can be shorter than the longest sequence
    rows = balanced_groups(lengths, -(-sum(lengths) // target))  # sequence numbers per row
    length = max(sum(lengths[i] for i in row) for row in rows) + 1  # the fullest row plus one filler token
    length += -length % pad_to_multiple_of
    filler = 0 if pad_token_id != 0 else 1  # any id: the filler's outputs are never read
    input_ids = torch.full((len(rows), length), filler, dtype=torch.long)  # (R, L)
    position_ids = torch.zeros_like(input_ids)  # (R, L)
    answer_mask = torch.zeros_like(input_ids)  # (R, L)
    sequence_index = torch.full_like(input_ids, -1)  # (R, L)
    for r, numbers in enumerate(rows):
        start = 0
        for number in numbers:
            end = start + len(sequences[number])
            input_ids[r, start:end] = sequences[number]
            position_ids[r, start:end] = torch.arange(end - start)
            answer_mask[r, start:end] = answer_masks[number]
            sequence_index[r, start:end] = number
            start = end
    # Filler tokens keep position 0: each is a segment of one (and no position exceeds the model's).
    # A sequence's first token is predicted by nothing (in a padded row there is no position
    # before it; here the one before belongs to another sequence): never score it.
    answer_mask[position_ids == 0] = 0
    return {"input_ids": input_ids, "position_ids": position_ids, "answer_mask": answer_mask,
            "sequence_index": sequence_index}


def balanced_groups(sizes: list[int], count: int) -> list[list[int]]:
    """The indices of ``sizes`` in ``count`` groups of about equal sum: largest first, each into
    the group with the smallest sum so far."""
    groups: list[list[int]] = [[] for _ in range(count)]
    sums = [0] * count
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        group = sums.index(min(sums))
        groups[group].append(i)
        sums[group] += sizes[i]
    return groups


def token_budget_groups(sizes: list[int], max_tokens: int) -> list[list[int]]:
    """The fewest balanced groups (:func:`balanced_groups`) whose sums stay within ``max_tokens``;
    an item larger than the budget gets a group of its own. Indices keep their order in each group."""
    count = -(-sum(sizes) // max_tokens)
    while True:
        groups = balanced_groups(sizes, count)
        if count >= len(sizes) or all(sum(sizes[i] for i in group) <= max_tokens for group in groups):
            return [sorted(group) for group in groups if group]
        count += 1


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in a collated batch, either layout."""
    return int((batch["sequence_index"] >= 0).sum())


@torch.no_grad()
def packs_correctly(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps packed sequences apart: two short sequences packed in one row must
    give the final hidden states each gives alone. A model whose attention ignores packed position
    ids (an older modelling file, a custom mask) lets the second sequence attend to the first,
    which moves its hidden states by far more than the tolerance, even at random init.
    """
    device = next(model.parameters()).device
    first, second = torch.arange(5, 12, device=device), torch.arange(20, 26, device=device)

    def final_hidden(input_ids: torch.Tensor, **layout: torch.Tensor) -> torch.Tensor:
        outputs = model(input_ids=input_ids[None], **layout, output_hidden_states=True, logits_to_keep=1,
                        use_cache=False)
        return outputs.hidden_states[-1][0].float()  # (T, H)

    was_training = model.training
    model.eval()
    try:
        alone = torch.cat([final_hidden(first), final_hidden(second)])  # (13, H)
        positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))]).to(device)[None]
        packed = final_hidden(torch.cat([first, second]), position_ids=positions)  # (13, H)
    finally:
        model.train(was_training)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return torch.allclose(packed, alone, atol=tolerance, rtol=tolerance)


def choose_packed(layout: str, device: str, model: torch.nn.Module) -> bool:
    """Resolve ``batch_layout`` (see :class:`dpolab.config.TrainConfig`) for ``model`` on ``device``."""
    if layout == "padded":
        return False
    if layout == "auto" and device != "cpu":
        logger.info("batch layout: padded (auto packs on CPU only; on GPUs it is not yet measured)")
        return False
    if packs_correctly(model):
        logger.info("batch layout: packed (no padding; model checked to keep packed sequences apart)")
        return True
    if layout == "packed":
        raise ConfigError(f"batch_layout: packed, but {type(model).__name__} attends across packed sequences "
                          "(its attention ignores per-sequence position ids); use batch_layout: padded")
    logger.warning("batch layout: padded (%s attends across packed sequences)", type(model).__name__)
    return False
