"""Answer-only, chunked log-probs equal the textbook full-logits computation, values and gradients."""

import pytest
import torch

from dpolab.model import build_builtin, disable_dropout
from dpolab.scoring import logps
from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.logps import answer_token_logps, concatenated_forward, concatenated_stats


def full_logits_logps(model, batch):
    """The straightforward way: (2B, T, V) logits, log_softmax, gather, mask, sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    token_logps = logits[:, :-1].log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)  # (2B, T-1)
    return (token_logps * batch["answer_mask"][:, 1:]).sum(-1).chunk(2)


# Rows of logits gradient per weight-gradient GEMM: one block for all 300 rows (the product is the
# gradient), 64-row blocks (one chunk each, summed), 128-row blocks (two chunks each, the last short).
BLOCK_ROWS = [320, 64, 128]


@pytest.mark.parametrize("block_rows", BLOCK_ROWS)
def test_chunked_token_logps_match_log_softmax_with_gradients(block_rows, monkeypatch):
    monkeypatch.setattr(logps, "weight_grad_block_rows", lambda *args: block_rows)
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (300,))
    upstream = torch.randn(300)
    expected = (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    grads_expected = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    got = answer_token_logps(hidden, weight, targets, chunk_size=64)  # 5 chunks, the last partial
    grads_got = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    assert torch.allclose(got, expected, atol=1e-5)
    for g_got, g_expected in zip(grads_got, grads_expected, strict=True):
        assert torch.allclose(g_got, g_expected, atol=1e-4)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    torch.manual_seed(0)
    hidden = torch.randn(70, 16, requires_grad=True)
    weight = torch.randn(50, 16)  # requires_grad False: LoRA leaves the head frozen
    targets = torch.randint(0, 50, (70,))
    expected = (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (grad_expected,) = torch.autograd.grad(expected.sum(), hidden)
    got = answer_token_logps(hidden, weight, targets, chunk_size=32)
    (grad_got,) = torch.autograd.grad(got.sum(), hidden)
    assert torch.allclose(grad_got, grad_expected, atol=1e-5) and weight.grad is None


def test_weight_gradient_blocks_hold_whole_chunks_within_their_memory_bounds():
    gpt2_head, tiny_head = torch.empty(50257, 768), torch.empty(50257, 64)
    # GPT-2 in bf16: 64 MiB of (rows, V) bf16 holds 667 rows, whole 128-row chunks: 640.
    assert logps.weight_grad_block_rows(gpt2_head, 128, 2) == 640
    assert logps.weight_grad_block_rows(gpt2_head, 128, 4) == 256  # fp32: half the rows
    # A 64-wide head's fp32 (V, H) sum is 12.9 MB, less than one chunk of logits: one chunk per block.
    assert logps.weight_grad_block_rows(tiny_head, 128, 4) == 128


def test_collator_stacks_chosen_then_rejected_and_masks_answers():
    batch = PreferenceCollator(pad_token_id=0)([
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["answer_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


def test_concatenated_forward_matches_full_logits_path():
    model = build_builtin("tiny-gpt2")
    disable_dropout(model)
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 50257, (n,), generator=generator).tolist()

    batch = PreferenceCollator(50256)([
        {"prompt_ids": ids(20), "chosen_ids": ids(7), "rejected_ids": ids(12)},
        {"prompt_ids": ids(5), "chosen_ids": ids(30), "rejected_ids": ids(3)},
    ])
    chosen, rejected = concatenated_forward(model, batch, chunk_size=16)
    (chosen.sum() - 2 * rejected.sum()).backward()
    got_grad = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    expected_chosen, expected_rejected = full_logits_logps(model, batch)
    (expected_chosen.sum() - 2 * expected_rejected.sum()).backward()
    assert torch.allclose(chosen, expected_chosen, atol=1e-3)
    assert torch.allclose(rejected, expected_rejected, atol=1e-3)
    assert torch.allclose(got_grad, model.transformer.wte.weight.grad, atol=1e-5)


@pytest.mark.parametrize("block_rows", [320, 64])
def test_bf16_head_accumulates_in_fp32(block_rows, monkeypatch):
    """bf16 hidden states and weight (CPU bf16 training): the matmuls run in bf16, the log-softmax and
    the weight gradient's sum over blocks in fp32, so values and gradients stay within bf16 rounding
    of the fp32 computation. 300 rows are padded to 320 on CPU (oneDNN's per-shape kernels): the
    padding rows must leave no trace in the values or the gradients."""
    monkeypatch.setattr(logps, "weight_grad_block_rows", lambda *args: block_rows)
    torch.manual_seed(0)
    hidden = torch.randn(300, 64)
    weight = torch.randn(500, 64) * 0.1
    targets = torch.randint(0, 500, (300,))
    upstream = torch.randn(300)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        h = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        token_logps = answer_token_logps(h, w, targets, chunk_size=64)
        grads = torch.autograd.grad((token_logps * upstream).sum(), (h, w))
        assert token_logps.shape == (300,) and grads[0].shape == (300, 64)
        assert token_logps.dtype == torch.float32 and grads[1].dtype == dtype
        results[dtype] = (token_logps, *(g.float() for g in grads))
    for exact, rounded in zip(results[torch.float32], results[torch.bfloat16], strict=True):
        assert (rounded - exact).norm() / exact.norm() < 1e-2  # bf16 keeps ~3 significant digits


def test_tail_and_wpo_statistics_match_full_logits_in_both_layouts():
    """LD-DPO's tail sums (tokens beyond the pair's shared length) and WPO's sum of log p - log sum p^2,
    from the answer-only head, padded and packed, equal the full-logits computation."""
    model = build_builtin("tiny-gpt2")
    disable_dropout(model)
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 50257, (n,), generator=generator).tolist()

    examples = [{"prompt_ids": ids(20), "chosen_ids": ids(7), "rejected_ids": ids(12)},
                {"prompt_ids": ids(5), "chosen_ids": ids(30), "rejected_ids": ids(3)}]
    padded = PreferenceCollator(50256)(examples)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]  # (4, T-1, V)
    token_logps = logits.log_softmax(-1).gather(2, padded["input_ids"][:, 1:, None]).squeeze(2)  # (4, T-1)
    log_sum_sq = torch.logsumexp(2 * logits.log_softmax(-1), -1)  # (4, T-1)
    mask = padded["answer_mask"][:, 1:].bool()
    position = mask.cumsum(1) - 1  # (4, T-1) index of each answer token within its answer
    shared = torch.tensor([7, 3, 7, 3])[:, None]  # min(|y_w|, |y_l|) of pair 0, 1, repeated for rejected
    expected = {"logps": (token_logps * mask).sum(1), "tail_logps": (token_logps * (mask & (position >= shared))).sum(1),
                "aligned_logps": ((token_logps - log_sum_sq) * mask).sum(1)}
    assert expected["tail_logps"].abs().min() == 0 and expected["tail_logps"].abs().max() > 10  # both kinds occur
    for packed in (False, True):
        got = concatenated_stats(model, PreferenceCollator(50256, packed=packed)(examples), chunk_size=16,
                                 tails=True, aligned=True)
        for key, value in expected.items():
            both = torch.cat([got[f"chosen_{key}"], got[f"rejected_{key}"]])
            assert torch.allclose(both, value, atol=1e-3), (packed, key, both, value)
