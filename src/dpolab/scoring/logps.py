"""Sequence log-probabilities of answers, computing the LM head only where it is needed.

A causal LM's head turns every position into a vocabulary-sized row of logits: (B, T, V) =
4 x 512 x 50,257 floats = 400 MB for one small batch, almost all of it for prompt and padding
positions whose log-probs DPO never uses. Here the transformer body runs as usual, then the
head is applied only at answer-token positions, in chunks of ``chunk_size`` tokens, by a custom
autograd function that keeps no logits for backward (it recomputes one chunk at a time). Peak
extra memory is (chunk_size, V) in the forward and a block of at most 64 MiB of logits gradients in
the backward, instead of (B, T, V).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# The backward pass keeps the gradient of up to this many bytes of logits rows and multiplies them
# by the hidden states in one GEMM: a large reduction dimension instead of one per chunk, and when
# one block covers every row the head's weight gradient comes out of that GEMM directly, with no
# fp32 (V, H) accumulator to zero, add into and cast back.
WEIGHT_GRAD_BLOCK_BYTES = 64 << 20
# oneDNN builds (JITs) a bf16/fp16 matmul kernel for every new shape on CPU, 15-30 ms each for the
# head's shapes: answer rows are padded to a multiple of this so a few shapes cover every step.
CPU_REDUCED_ROW_BUCKET = 32


class _AnswerTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, chunked; backward recomputes each chunk.

    With ``sum_sq`` it also returns log sum_v p(v)^2 per row (WPO's weights; no gradient), else an
    empty tensor: the default path does no extra work.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype, sum_sq):
        # hidden (N, H), weight (V, H), targets (N,)
        n_tokens = hidden.shape[0]
        token_logps = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)  # (N,)
        logsumexp = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)  # (N,)
        log_sum_sq = torch.empty(n_tokens if sum_sq else 0, dtype=torch.float32, device=hidden.device)  # (N,) or (0,)
        weight_c = weight.to(compute_dtype)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            logits = (hidden[start:end].to(compute_dtype) @ weight_c.T).float()  # (n, V)
            logsumexp[start:end] = torch.logsumexp(logits, dim=-1)
            token_logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - logsumexp[start:end]
            if sum_sq:  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)
                log_sum_sq[start:end] = torch.logsumexp(logits.mul_(2), dim=-1) - 2 * logsumexp[start:end]
        ctx.save_for_backward(hidden, weight, targets, logsumexp)
        ctx.chunk_size = chunk_size
        ctx.compute_dtype = compute_dtype
        ctx.mark_non_differentiable(log_sum_sq)
        return token_logps, log_sum_sq

    @staticmethod
    def backward(ctx, grad_token_logps, _grad_log_sum_sq):  # (N,)
        hidden, weight, targets, logsumexp = ctx.saved_tensors
        n_tokens, chunk_size, compute_dtype = hidden.shape[0], ctx.chunk_size, ctx.compute_dtype
        weight_c = weight.to(compute_dtype)
        vocab = weight.shape[0]
        block_rows = weight_grad_block_rows(weight, chunk_size, compute_dtype.itemsize)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None  # (V, H): one block's product, or an fp32 sum over blocks
        for block_start in range(0, n_tokens, block_rows):
            block_end = min(block_start + block_rows, n_tokens)
            hidden_c = hidden[block_start:block_end].to(compute_dtype)  # (n, H)
            grad_logits_block = torch.empty(block_end - block_start, vocab, dtype=compute_dtype,
                                            device=hidden.device)  # (n, V)
            for start in range(block_start, block_end, chunk_size):
                end = min(start + chunk_size, block_end)
                rows = slice(start - block_start, end - block_start)
                if compute_dtype == torch.float32:  # the logits go straight into the block
                    logits = torch.mm(hidden_c[rows], weight_c.T, out=grad_logits_block[rows])  # (c, V)
                else:  # the softmax in fp32, the result rounded into the block below
                    logits = (hidden_c[rows] @ weight_c.T).float()  # (c, V)
                # d log p[target] / d logits = onehot(target) - softmax(logits)
                # In place: one (c, V) buffer instead of three.
                grad_logits = logits.sub_(logsumexp[start:end, None]).exp_().mul_(-grad_token_logps[start:end, None])
                grad_logits[torch.arange(end - start, device=hidden.device), targets[start:end]] += (
                    grad_token_logps[start:end])
                if compute_dtype != torch.float32:
                    grad_logits_block[rows] = grad_logits
            if grad_hidden is not None:
                grad_hidden[block_start:block_end] = (grad_logits_block @ weight_c).to(hidden.dtype)  # (n, H)
            if not ctx.needs_input_grad[1]:  # a frozen head (LoRA): no (V, H) product at all
                continue
            if grad_weight is not None and compute_dtype == torch.float32:
                grad_weight.addmm_(grad_logits_block.T, hidden_c)  # in place: no (V, H) temporary
                continue
            # bf16/fp16: the matmul units' fast path, products accumulated in fp32 inside the kernel
            # and rounded once per block; several blocks are summed in fp32.
            block_grad = grad_logits_block.T @ hidden_c  # (V, H)
            if grad_weight is None:
                grad_weight = block_grad if block_end == n_tokens else block_grad.float()
            else:
                grad_weight.add_(block_grad)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def weight_grad_block_rows(weight: torch.Tensor, chunk_size: int, itemsize: int) -> int:
    """Rows of logits gradient per weight-gradient GEMM in the head's backward: a multiple of
    ``chunk_size``, at most :data:`WEIGHT_GRAD_BLOCK_BYTES`, and never more memory than the fp32
    (V, H) sum that one block for all rows saves (a small model's head: one chunk per block).

    weight: (V, H) the head; itemsize: bytes per element of the compute dtype."""
    block_bytes = min(WEIGHT_GRAD_BLOCK_BYTES, weight.numel() * 4)
    return max(1, block_bytes // (weight.shape[0] * itemsize) // chunk_size) * chunk_size


def answer_token_logps(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128
) -> torch.Tensor:
    """Log-prob of each target token given its hidden state.

    Args:
        hidden: (N, H) final hidden states at the positions *before* each target token.
        lm_head_weight: (V, H) output embedding.
        targets: (N,) token ids.
        chunk_size: tokens per chunk; 128 x 50,257 fp32 logits = 26 MB, small enough for the
            allocator to reuse instead of mapping fresh pages each time.

    Returns: (N,) float32 log-probs.
    """
    return answer_token_stats(hidden, lm_head_weight, targets, chunk_size)[0]


def answer_token_stats(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128,
    sum_sq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`answer_token_logps` (N,) and, with ``sum_sq``, each row's log sum_v p(v)^2 (N,)
    without gradient (WPO's weights), from the same chunks; without it an empty tensor."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    n_tokens = hidden.shape[0]
    if device_type == "cpu" and compute_dtype in (torch.bfloat16, torch.float16):
        padding = -n_tokens % CPU_REDUCED_ROW_BUCKET  # zero rows: their log-probs are dropped below
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, padding))  # (N + padding, H)
        targets = torch.nn.functional.pad(targets, (0, padding))  # (N + padding,)
    with torch.autocast(device_type=device_type, enabled=False):
        token_logps, log_sum_sq = _AnswerTokenLogProbs.apply(
            hidden, lm_head_weight, targets, chunk_size, compute_dtype, sum_sq)
    return token_logps[:n_tokens], log_sum_sq[:n_tokens]


def batch_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 128) -> torch.Tensor:
    """Summed log-prob of the answer tokens of each sequence in a collated batch, padded or packed
    (the layouts are described in :mod:`dpolab.scoring.collate`).

    Args:
        model: a causal LM (possibly wrapped by DDP: we call its own forward so gradient
            synchronisation hooks run).
        batch: ``input_ids``, ``answer_mask``, ``sequence_index`` (R, L), ``answer_lengths`` (S,), and
            ``attention_mask`` (padded) or ``position_ids`` (packed), all (R, L).

    Returns: (S,) float32 sum over answer tokens of log pi(token | tokens before it).
    """
    return batch_answer_stats(model, batch, chunk_size)["logps"]


def batch_answer_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 128,
                       tails: bool = False, aligned: bool = False) -> dict[str, torch.Tensor]:
    """:func:`batch_logps`'s ``logps`` (S,), plus per-sequence statistics some losses need, from
    the same per-token log-probs (still no (R, L, V) logits):

    * ``tail_logps`` (S,), with ``tails`` (LD-DPO): the part of ``logps`` beyond the pair's shared
      length min(|y_w|, |y_l|); the batch must be B chosen then B rejected sequences.
    * ``aligned_logps`` (S,), with ``aligned`` (WPO), no gradient: the sum over answer tokens of
      log p(token) - log sum_v p(v)^2.
    """
    layout = ({"position_ids": batch["position_ids"]} if "position_ids" in batch
              else {"attention_mask": batch["attention_mask"]})
    # logits_to_keep=1: the model's own head runs on one position only; we take the final
    # hidden states and apply the head at answer positions ourselves.
    outputs = model(input_ids=batch["input_ids"], **layout, output_hidden_states=True, logits_to_keep=1,
                    use_cache=False)
    hidden = outputs.hidden_states[-1]  # (R, L, H), after the final layer norm
    target_mask = batch["answer_mask"][:, 1:].bool()  # (R, L-1): token t is predicted at position t-1
    rows = batch["sequence_index"][:, 1:][target_mask]  # (N,) which sequence each answer token is in
    answer_hidden = hidden[:, :-1][target_mask]  # (N, H)
    targets = batch["input_ids"][:, 1:][target_mask]  # (N,)
    with gathered_output_weight(model) as lm_head:  # (V, H)
        token_logps, log_sum_sq = answer_token_stats(answer_hidden, lm_head, targets, chunk_size, aligned)  # (N,)
    num_sequences = batch["answer_lengths"].shape[0]

    def per_sequence(values: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:  # (N,) -> (S,)
        index = rows if where is None else rows[where]
        values = values if where is None else values[where]
        return torch.zeros(num_sequences, dtype=torch.float32, device=token_logps.device).index_add(0, index, values)

    stats = {"logps": per_sequence(token_logps)}
    if tails:
        stats["tail_logps"] = per_sequence(token_logps, tail_token_mask(rows, batch["answer_lengths"]))
    if aligned:
        stats["aligned_logps"] = per_sequence(token_logps.detach() - log_sum_sq)
    return stats


def tail_token_mask(rows: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """(N,) whether each answer token lies beyond its pair's shared length min(|y_w|, |y_l|).

    Args:
        rows: (N,) the sequence of each answer token, in layout order (a sequence's tokens are
            consecutive there, padded or packed); sequences 0..B-1 chosen, B..2B-1 rejected.
        answer_lengths: (2B,) answer tokens per sequence.
    """
    chosen_lengths, rejected_lengths = answer_lengths.chunk(2)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2)  # (2B,)
    order = torch.arange(rows.shape[0], device=rows.device)  # (N,)
    first = torch.full_like(shared, rows.shape[0]).scatter_reduce(0, rows, order, reduce="amin")  # (2B,)
    return order - first[rows] >= shared[rows]  # position inside its answer >= shared length


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    chunk_size: int = 128,
) -> torch.Tensor:
    """:func:`batch_logps` of right-padded (S, T) tensors (the web app's and the samples' scoring).

    Returns: (S,) float32 summed answer log-probs.
    """
    sequence_index = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask,
             "sequence_index": sequence_index.masked_fill(attention_mask == 0, -1),  # (S, T)
             "answer_lengths": answer_mask.sum(1)}  # (S,)
    return batch_logps(model, batch, chunk_size)


def concatenated_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-probs of chosen and rejected answers from ONE forward pass.

    The collator stacks the B chosen sequences on top of the B rejected ones (or packs all 2B in
    rows): one pass instead of two uses the hardware better and, under FSDP/DDP, triggers one
    parameter gather / gradient sync instead of two.

    Returns: chosen_logps (B,), rejected_logps (B,).
    """
    return batch_logps(model, batch, chunk_size).chunk(2)


def concatenated_stats(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 128,
                       tails: bool = False, aligned: bool = False) -> dict[str, torch.Tensor]:
    """:func:`concatenated_forward` with :func:`batch_answer_stats`' extras: ``chosen_logps``,
    ``rejected_logps`` (B,) and, as asked, ``chosen_tail_logps`` ... ``rejected_aligned_logps`` (B,)."""
    stats = batch_answer_stats(model, batch, chunk_size, tails, aligned)
    return {f"{side}_{key}": value for key, both in stats.items() for side, value in zip(("chosen", "rejected"),
                                                                                           both.chunk(2), strict=True)}


def answer_lengths(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Answer tokens per pair, ``{"chosen_lengths": (B,), "rejected_lengths": (B,)}`` (IPO needs them)."""
    chosen_lengths, rejected_lengths = batch["answer_lengths"].float().chunk(2)
    return {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}


@contextmanager
def gathered_output_weight(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The LM head's full (V, H) weight for use *after* the model's forward, sharded or not.

    We apply the head ourselves, outside the model's forward. Unsharded (one process, DDP) that is
    a plain read. Under FSDP2 (``fully_shard``, what ``accelerate``/Trainer use) the weight is
    whole only between its unit's pre- and post-forward hooks: when the head shares the root unit
    (GPT-2's tied embedding, accelerate's transformer-layer wrapping) FSDP2 never reshards the root
    after forward, so it is still whole here; when the head is its own unit (or its unit resharded)
    it is a sharded ``DTensor`` and we all-gather it the way FSDP2 expects, with the unit's own
    ``unshard()``. The gradient then lands on the unsharded parameter, and FSDP2's end-of-backward
    callback reduce-scatters it (it runs post-backward for units whose forward output got no
    gradient). Without autograd (reference pass, eval) we reshard again at once.
    """
    weight = output_weight(model)
    if not _is_sharded(weight):
        yield weight
        return
    owner = _fsdp_owner(model)
    owner.unshard()
    try:
        yield output_weight(model)
    finally:
        if not torch.is_grad_enabled():
            owner.reshard()


def _is_sharded(weight: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor)


def _fsdp_owner(model: torch.nn.Module) -> Any:
    """The FSDP2 unit holding the head's weight: the head itself if it was wrapped alone, else the root."""
    from torch.distributed.fsdp import FSDPModule

    head = _unwrap(model).get_output_embeddings()
    for candidate in (head, _unwrap(model)):
        if isinstance(candidate, FSDPModule):
            return candidate
    raise RuntimeError("the LM-head weight is a sharded DTensor but no FSDP2 unit owns it; "
                       "wrap the model with torch.distributed.fsdp.fully_shard")


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The LM head's (V, H) weight. An int8 head from :mod:`dpolab.generate` (the web app's fast
    option) keeps it packed behind a method; scoring answers with it needs it dequantised."""
    weight = _unwrap(model).get_output_embeddings().weight
    return weight().dequantize() if callable(weight) else weight


def _unwrap(model: torch.nn.Module) -> Any:
    return model.module if hasattr(model, "module") else model
