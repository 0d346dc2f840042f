"""dpolab's DPO numbers equal TRL 1.16 DPOTrainer's on the same weights, pairs and beta.

TRL's side runs through TRL's own code: its collator, its fused LM head, its ``compute_loss``
and its ``_metrics``, with the reference either scored at every step or precomputed by TRL.
dpolab's side is :func:`concatenated_forward` + :func:`preference_loss` / :func:`preference_metrics`
with the reference scored by :func:`score_pairs` (what the cached reference pass runs).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dpolab.config import TrainConfig
from dpolab.data import prepare_data
from dpolab.model import build_builtin, disable_dropout, load_tokenizer, use_fused_gelu
from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.logps import answer_lengths, concatenated_forward
from dpolab.scoring.loss import chosen_nll, preference_loss, preference_metrics
from dpolab.scoring.pairs import score_pairs

trl = pytest.importorskip("trl")

BETA = 0.1
N_PAIRS = 4
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Reference weights, a policy that differs from them (so rewards are not all 0), real pairs."""
    tokenizer = load_tokenizer("tiny-gpt2")
    config = TrainConfig(max_train_pairs=N_PAIRS, max_eval_pairs=1, seed=3,
                         cache_dir=str(tmp_path_factory.mktemp("parity-cache")))
    pairs = prepare_data(config, tokenizer)[0]["train"]
    reference = build_builtin("tiny-gpt2")
    disable_dropout(reference)
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return tokenizer, pairs, reference, policy


def dpolab_numbers(pairs, reference, policy, loss_type: str, rpo_alpha: float = 0.0) -> dict[str, float]:
    # As the dpolab engine runs them (fused GELU); TRL keeps GPT-2's stock Python GELU.
    reference, policy = copy.deepcopy(reference), copy.deepcopy(policy)
    assert use_fused_gelu(reference) == use_fused_gelu(policy) == 2
    ref_chosen, ref_rejected = score_pairs(reference, pairs, PreferenceCollator(50256), batch_size=8,
                                                       chunk_size=128)  # (B,), (B,)
    batch = PreferenceCollator(50256)([pairs[i] for i in range(len(pairs))])
    policy.train()
    chosen, rejected = concatenated_forward(policy, batch)  # (B,), (B,)
    losses, chosen_rewards, rejected_rewards = preference_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                               beta=BETA, loss_type=loss_type,
                                                               **answer_lengths(batch))
    metrics = preference_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected)
    metrics["loss"] += rpo_alpha * chosen_nll(chosen, answer_lengths(batch)["chosen_lengths"]).item()
    return metrics


def trl_numbers(tmp_path, tokenizer, pairs, reference, policy, loss_type: str, precompute: bool,
                rpo_alpha: float = 0.0) -> dict[str, float]:
    from dpolab.dpo.trl_engine import pretokenized_trainer_class

    # TRL 1.16's RPO: its "sft" loss (mean chosen-token NLL) added with weight alpha.
    losses = {"loss_type": [loss_type, "sft"], "loss_weights": [1.0, rpo_alpha]} if rpo_alpha else \
        {"loss_type": [loss_type]}
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=BETA, **losses, max_length=512,
                         precompute_ref_log_probs=precompute, gradient_checkpointing=False, bf16=False,
                         use_cpu=True, report_to="none", per_device_train_batch_size=N_PAIRS,
                         dataloader_num_workers=0)
    trainer_class = pretokenized_trainer_class()
    if precompute:
        # TRL precomputes with the model it is given (no ref_model kept): give it the reference
        # weights, then load the policy weights into it, as training would have moved them.
        trainer = trainer_class(model=copy.deepcopy(reference), args=args, train_dataset=pairs,
                                processing_class=tokenizer)
        trainer.model.load_state_dict(policy.state_dict())
        assert "ref_chosen_logps" in trainer.train_dataset.column_names
    else:
        trainer = trainer_class(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                                train_dataset=pairs, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    metrics["loss"] = loss.item()
    return metrics


@pytest.mark.parametrize("precompute", [False, True], ids=["ref-every-step", "ref-precomputed"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpolab_matches_trl_dpotrainer(setup, tmp_path, loss_type, precompute):
    tokenizer, pairs, reference, policy = setup
    ours = dpolab_numbers(pairs, reference, policy, loss_type)
    theirs = trl_numbers(tmp_path, tokenizer, pairs, reference, policy, loss_type, precompute)
    # A policy equal to its reference would make every reward 0 and the check vacuous.
    assert abs(ours["rewards/margins"]) > 1e-2
    for key in METRICS:
        # Absolute 1e-4 even for summed log-probs of O(-300) (fp32 rounding there is ~3e-5).
        assert abs(ours[key] - theirs[key]) <= 1e-4, (key, ours[key], theirs[key], json.dumps(ours))


def test_rpo_alpha_matches_trl_dpotrainer_sft_term(setup, tmp_path):
    """--rpo-alpha 0.5: DPO + 0.5 x chosen-token NLL, against TRL 1.16's loss_type ["sigmoid", "sft"]."""
    tokenizer, pairs, reference, policy = setup
    plain = dpolab_numbers(pairs, reference, policy, "sigmoid")
    ours = dpolab_numbers(pairs, reference, policy, "sigmoid", rpo_alpha=0.5)
    theirs = trl_numbers(tmp_path, tokenizer, pairs, reference, policy, "sigmoid", precompute=False, rpo_alpha=0.5)
    assert ours["loss"] - plain["loss"] > 1.0  # the term is really in (a random model: NLL ~ ln 50257 = 10.8)
    assert abs(ours["loss"] - theirs["loss"]) <= 1e-4, (ours["loss"], theirs["loss"])


def test_trl_engine_writes_a_run_folder(tmp_path):
    from dpolab.dpo.trainer import train
    from dpolab.runs import RunFolder
    from tests.conftest import tiny_config

    config = tiny_config(engine="trl", max_train_pairs=8, max_eval_pairs=4, max_steps=2, max_length=256,
                         max_prompt_length=128)
    run = train(config, tmp_path / "trl-run")
    opened = RunFolder.open(run.path)
    assert opened.info()["engine"] == "trl"
    summary = opened.summary()
    assert summary["train"]["steps"] == 2
    for key in METRICS:
        assert isinstance(summary["eval"][key], float), key
    assert summary["pairs_per_s"] > 0 and summary["tokens_per_s"] > 0
    train_rows = opened.metrics("train")
    assert [r["step"] for r in train_rows] == [1, 2]
    assert train_rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert opened.has_model()


def test_trl_engine_without_trl_is_a_config_error(monkeypatch):
    import builtins

    from dpolab.dpo import trl_engine
    from dpolab.errors import ConfigError

    real_import = builtins.__import__

    def no_trl(name, *args, **kwargs):
        if name == "trl" or name.startswith("trl."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trl)
    with pytest.raises(ConfigError, match=r"pip install 'dpolab\[trl\]'"):
        trl_engine.train_trl(TrainConfig(engine="trl"), "/nonexistent/never-created")
