"""Packed (padding-free) batches: the layout by hand, the same log-probs and gradients as padded
batches on real pairs (GPT-2 and a RoPE chat model), and the check that refuses a model whose
attention would mix packed sequences."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpolab.errors import ConfigError
from dpolab.model import build_builtin, disable_dropout, load_tokenizer, prepare_device
from dpolab.scoring.collate import PreferenceCollator, batch_tokens, choose_packed, packs_correctly
from dpolab.scoring.logps import answer_lengths, concatenated_forward
from tests.chat_model import build_chat_model
from tests.conftest import tiny_config

PAIRS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12]},
]


def test_packed_layout_by_hand():
    batch = PreferenceCollator(pad_token_id=0, packed=True, row_tokens=8)(PAIRS)
    # Sequences: 0 = [1,2,3,4,5], 1 = [7,8,9], 2 = [1,2,3,6], 3 = [7,8,10,11,12]: 17 tokens make
    # ceil(17 / 8) = 3 rows. Longest first, each into the shortest row: 0, 3 and 2 open the rows, 1
    # joins 2 (4 tokens, the shortest). Rows end with filler (id 1: not the pad id) at position 0.
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 1, 1],
                                           [7, 8, 10, 11, 12, 1, 1, 1],
                                           [1, 2, 3, 6, 7, 8, 9, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 0, 0],
                                              [0, 1, 2, 3, 4, 0, 0, 0],
                                              [0, 1, 2, 3, 0, 1, 2, 0]]
    assert batch["sequence_index"].tolist() == [[0, 0, 0, 0, 0, -1, -1, -1],
                                                [3, 3, 3, 3, 3, -1, -1, -1],
                                                [2, 2, 2, 2, 1, 1, 1, -1]]
    assert batch["answer_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0],
                                             [0, 0, 1, 1, 1, 0, 0, 0],
                                             [0, 0, 0, 1, 0, 0, 1, 0]]
    assert batch["answer_lengths"].tolist() == [2, 1, 1, 3]
    assert "attention_mask" not in batch
    assert batch_tokens(batch) == 17 == batch_tokens(PreferenceCollator(pad_token_id=0)(PAIRS))
    assert {k: v.tolist() for k, v in answer_lengths(batch).items()} == {"chosen_lengths": [2.0, 1.0],
                                                                         "rejected_lengths": [1.0, 3.0]}


def test_an_answer_token_at_a_sequence_start_is_never_scored():
    # No prompt: the first answer token has no position before it in its sequence (padded layout
    # drops it too); packed, the position before it belongs to another sequence.
    batch = PreferenceCollator(pad_token_id=0, packed=True)([{"prompt_ids": [], "chosen_ids": [4, 5],
                                                              "rejected_ids": [6, 7, 8]}])
    assert batch["answer_mask"][batch["position_ids"] == 0].sum() == 0


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-gpt2")


def real_pairs(tokenizer, n: int):
    from dpolab.data import prepare_data

    datasets, _, _ = prepare_data(tiny_config(max_train_pairs=n, max_eval_pairs=1), tokenizer)
    return [datasets["train"][i] for i in range(n)]


def logps_and_grads(model, batch):
    model.zero_grad()
    chosen, rejected = concatenated_forward(model, batch, chunk_size=64)  # (B,), (B,)
    (chosen.sum() - 2 * rejected.sum()).backward()
    return torch.cat([chosen, rejected]).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("row_tokens", [4096, 300])  # one row; several rows with filler tails
def test_packed_equals_padded_on_real_pairs_gpt2(tokenizer, row_tokens):
    model = build_builtin("tiny-gpt2")
    disable_dropout(model)
    pairs = real_pairs(tokenizer, 6)
    padded = PreferenceCollator(tokenizer.pad_token_id)(pairs)
    packed = PreferenceCollator(tokenizer.pad_token_id, packed=True, row_tokens=row_tokens)(pairs)
    assert packed["input_ids"].numel() < 0.8 * padded["input_ids"].numel()  # the point: less to compute
    assert (packed["input_ids"].shape[0] > 1) == (row_tokens == 300)
    padded_logps, padded_grads = logps_and_grads(model, padded)
    packed_logps, packed_grads = logps_and_grads(model, packed)
    assert torch.allclose(packed_logps, padded_logps, rtol=1e-5, atol=1e-4)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-5), name


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here: the packed path on a GPU (block-diagonal mask from packed "
                    "position ids, the flash / memory-efficient SDPA kernels) is checked where one exists")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_packed_equals_padded_on_a_gpu(tokenizer, dtype, tolerance):
    """What `batch_layout: packed` runs on a GPU, fp32 and under bf16 autocast (GPU bf16 training),
    with the attention settings a GPU stage makes (`prepare_device`: no cuDNN attention)."""
    prepare_device("cuda")
    model = build_builtin("tiny-gpt2").to("cuda")
    disable_dropout(model)
    pairs = real_pairs(tokenizer, 6)
    results = []
    for collate in (PreferenceCollator(tokenizer.pad_token_id), PreferenceCollator(tokenizer.pad_token_id, packed=True,
                                                                                    row_tokens=300)):
        batch = {k: v.to("cuda") for k, v in collate(pairs).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            results.append(logps_and_grads(model, batch))
    (padded_logps, padded_grads), (packed_logps, packed_grads) = results
    assert torch.allclose(packed_logps, padded_logps, rtol=tolerance, atol=10 * tolerance)
    for name, grad in padded_grads.items():  # relative to each tensor's norm: bf16 rounds every element
        assert (packed_grads[name] - grad).norm() <= tolerance * grad.norm() + 1e-6, name


def test_packed_equals_padded_on_a_rope_chat_model(tmp_path, tokenizer):
    folder = build_chat_model(tmp_path / "chat")
    model = AutoModelForCausalLM.from_pretrained(folder)
    disable_dropout(model)
    assert packs_correctly(model)
    pairs = real_pairs(tokenizer, 4)  # GPT-2 ids: the chat model's vocabulary extends GPT-2's
    padded_logps, _ = logps_and_grads(model, PreferenceCollator(tokenizer.pad_token_id)(pairs))
    packed_logps, _ = logps_and_grads(model, PreferenceCollator(tokenizer.pad_token_id, packed=True)(pairs))
    assert torch.allclose(packed_logps, padded_logps, rtol=1e-5, atol=1e-4)


def test_a_model_that_mixes_packed_sequences_is_caught(monkeypatch):
    model = build_builtin("tiny-gpt2")
    disable_dropout(model)
    assert packs_correctly(model)
    assert choose_packed("auto", "cpu", model) and choose_packed("packed", "cpu", model)
    # What an attention that ignores per-sequence position ids does: plain causal over the row.
    monkeypatch.setattr("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None)
    assert not packs_correctly(model)
    assert not choose_packed("auto", "cpu", model)  # falls back to padding, with a warning
    with pytest.raises(ConfigError, match="attends across packed sequences"):
        choose_packed("packed", "cpu", model)


def test_auto_keeps_padding_on_gpus_and_padded_means_padded():
    model = build_builtin("tiny-gpt2")
    assert not choose_packed("auto", "cuda", model)
    assert not choose_packed("padded", "cpu", model)
