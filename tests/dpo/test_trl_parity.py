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


# -- the loss family: `dpolab evaluate --dataset` with each option's flags against TRL 1.16 --------

FAMILY_PAIRS = 8
# (case id, `dpolab evaluate` flags, TRL 1.16 DPOConfig arguments). Every case sets beta so that
# the option's own terms are not drowned out (and `--beta` itself is exercised).
FAMILY = [
    ("sigmoid", [], {"loss_type": ["sigmoid"]}),
    ("beta", ["--beta", "0.5"], {"loss_type": ["sigmoid"], "beta": 0.5}),
    ("hinge", ["--loss-type", "hinge"], {"loss_type": ["hinge"]}),
    ("ipo", ["--loss-type", "ipo"], {"loss_type": ["ipo"]}),
    ("exo_pair", ["--loss-type", "exo_pair", "--label-smoothing", "0.001"],
     {"loss_type": ["exo_pair"], "label_smoothing": 0.001}),
    ("nca_pair", ["--loss-type", "nca_pair"], {"loss_type": ["nca_pair"]}),
    ("robust", ["--loss-type", "robust", "--label-smoothing", "0.1"], {"loss_type": ["robust"], "label_smoothing": 0.1}),
    ("bco_pair", ["--loss-type", "bco_pair"], {"loss_type": ["bco_pair"]}),
    ("sppo_hard", ["--loss-type", "sppo_hard"], {"loss_type": ["sppo_hard"]}),
    ("aot", ["--loss-type", "aot", "--label-smoothing", "0.1"], {"loss_type": ["aot"], "label_smoothing": 0.1}),
    ("aot_unpaired", ["--loss-type", "aot_unpaired"], {"loss_type": ["aot_unpaired"]}),
    ("apo_zero", ["--loss-type", "apo_zero"], {"loss_type": ["apo_zero"]}),
    ("apo_down", ["--loss-type", "apo_down"], {"loss_type": ["apo_down"]}),
    ("discopop", ["--loss-type", "discopop", "--discopop-tau", "0.5"], {"loss_type": ["discopop"], "discopop_tau": 0.5}),
    ("sft", ["--loss-type", "sft"], {"loss_type": ["sft"]}),
    ("sigmoid_norm", ["--loss-type", "sigmoid_norm"], {"loss_type": ["sigmoid_norm"]}),
    ("mpo_weights", ["--loss-type", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2,1.0"],
     {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    ("rpo_alpha", ["--rpo-alpha", "0.5"], {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    ("ld_alpha", ["--ld-alpha", "0.3"], {"loss_type": ["sigmoid"], "ld_alpha": 0.3}),
    ("use_weighting", ["--use-weighting"], {"loss_type": ["sigmoid"], "use_weighting": True}),
    ("forward_kl", ["--f-divergence-type", "forward_kl"], {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"}),
    ("js_divergence", ["--f-divergence-type", "js_divergence"],
     {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"}),
    ("alpha_divergence", ["--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", "0.3"],
     {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
]
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected")
PARITY_TABLE: list[tuple[str, float, float]] = []  # (case, TRL eval loss, dpolab eval loss), printed at the end


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A policy and a reference saved as model folders, 8 short real pairs as a JSONL file, the
    pairs as dpolab tokenizes them, and the dpolab plain-sigmoid numbers to compare against."""
    from dpolab.data import prepare_eval_pairs
    from tests.data.test_formats import real_pairs

    root = tmp_path_factory.mktemp("family")
    tokenizer = load_tokenizer("tiny-gpt2")
    reference = build_builtin("tiny-gpt2")
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    for name, model in (("reference", reference), ("policy", policy)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    # The shortest real pairs: TRL applies its LM head at every position, so this keeps each case fast.
    rows = sorted(({k: p[k] for k in ("prompt", "chosen", "rejected")} for p in real_pairs(120)),
                  key=lambda r: len(tokenizer(r["prompt"] + r["chosen"] + r["rejected"]).input_ids))[:FAMILY_PAIRS]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = prepare_eval_pairs(TrainConfig(model=str(root / "reference"), dataset=str(root / "pairs.jsonl")),
                                  load_tokenizer(str(root / "policy")))
    yield root, tokenizer, pairs
    print("\nparity with TRL 1.16 (eval loss on 8 pairs)\n"
          f"{'option':<18} {'TRL':>12} {'dpolab':>12} {'|diff|':>9}")
    for case, theirs, ours in PARITY_TABLE:
        print(f"{case:<18} {theirs:>12.6f} {ours:>12.6f} {abs(theirs - ours):>9.1e}")


@pytest.fixture(scope="module")
def trl_head_memo():
    """TRL's fused LM head, memoised on its exact inputs. On CPU it scores every position of every
    sequence (prompt and padding too) and dominates each case's time; every case feeds it the same
    hidden states, so a case's numbers are TRL's own, computed once."""
    import hashlib

    from trl.trainer import utils

    head, memo = utils._ChunkedLogProbFunction, {}

    class Memoised:
        @staticmethod
        def apply(hidden, weight, bias, labels, *rest):
            key = tuple(hashlib.sha1(t.detach().contiguous().numpy().tobytes()).hexdigest()
                        for t in (hidden, weight, labels)) + (repr(rest),)
            if key not in memo:
                memo[key] = head.apply(hidden, weight, bias, labels, *rest)
            return memo[key]

    utils._ChunkedLogProbFunction = Memoised
    yield
    utils._ChunkedLogProbFunction = head


def evaluate_cli(root, flags: list[str], monkeypatch, name: str) -> dict[str, float]:
    """`dpolab evaluate policy --reference reference --dataset pairs.jsonl FLAGS` from the folder holding them."""
    from dpolab.cli import main

    monkeypatch.chdir(root)
    assert main(["evaluate", "policy", "--reference", "reference", "--dataset", "pairs.jsonl",
                 "--output-dir", f"out-{name}", *flags]) == 0
    metrics = json.loads((root / f"out-{name}" / "metrics.json").read_text())["pairs"]
    assert metrics["pairs"] == FAMILY_PAIRS
    return metrics


def trl_eval(root, tokenizer, pairs, trl_args: dict) -> dict[str, float]:
    """TRL 1.16 DPOTrainer.evaluate() on the same token ids, the reference scored by TRL at each step."""
    from transformers import AutoModelForCausalLM

    from dpolab.dpo.trl_engine import pretokenized_trainer_class

    args = trl.DPOConfig(output_dir=str(root / "trl"), **{"beta": BETA, **trl_args}, max_length=512,
                         use_cpu=True, bf16=False, report_to="none", per_device_eval_batch_size=FAMILY_PAIRS,
                         dataloader_num_workers=0)
    trainer = pretokenized_trainer_class()(
        model=AutoModelForCausalLM.from_pretrained(root / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(root / "reference"), args=args,
        train_dataset=pairs, eval_dataset=pairs, processing_class=tokenizer)
    return {key.removeprefix("eval_"): value for key, value in trainer.evaluate().items()}


@pytest.mark.parametrize(("case", "flags", "trl_args"), FAMILY, ids=[case for case, _, _ in FAMILY])
def test_loss_option_matches_trl_dpotrainer_eval(family, trl_head_memo, monkeypatch, case, flags, trl_args):
    root, tokenizer, pairs = family
    ours = evaluate_cli(root, flags, monkeypatch, case)
    theirs = trl_eval(root, tokenizer, pairs, trl_args)
    PARITY_TABLE.append((case, theirs["loss"], ours["loss"]))
    assert abs(ours["rewards/margins"]) > 1e-2  # a policy equal to its reference would prove little
    if case != "sigmoid":  # the flags reached the loss: it differs from plain DPO's
        plain = json.loads((root / "out-sigmoid" / "metrics.json").read_text())["pairs"]
        assert abs(ours["loss"] - plain["loss"]) > 1e-3, (case, ours["loss"])
    # sft alone reads no reference: dpolab skips it (rewards become beta log pi); TRL still scores one.
    keys = ("loss", "logps/chosen", "logps/rejected") if case == "sft" else ("loss", *REWARD_METRICS)
    for key in keys:
        # 1e-4, relative above 1: sppo_hard squares log-ratios of ~5 nats, whose fp32 sums differ by ~1e-5.
        assert abs(ours[key] - theirs[key]) <= 1e-4 * max(1.0, abs(theirs[key])), (case, key, ours[key], theirs[key])


def test_simpo_matches_trl_cpotrainer_and_needs_no_reference(family, monkeypatch):
    """`--loss-type simpo --beta 2.0` (no --reference: SimPO reads none) against TRL 1.16's
    CPOTrainer(loss_type="simpo", cpo_alpha=0), its own loss code on our token ids."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    root, tokenizer, pairs = family
    from dpolab.cli import main

    monkeypatch.chdir(root)
    assert main(["evaluate", "policy", "--dataset", "pairs.jsonl", "--output-dir", "out-simpo",
                 "--loss-type", "simpo", "--beta", "2.0"]) == 0
    ours = json.loads((root / "out-simpo" / "metrics.json").read_text())["pairs"]
    assert ours["reference_free"] is True and "logps/ref_chosen" not in ours

    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(output_dir=str(root / "cpo"), loss_type="simpo", cpo_alpha=0.0, beta=2.0,
                     simpo_gamma=1.0,  # dpolab's default: beta / 2 (the authors' gamma/beta = 0.5)
                     max_length=512, use_cpu=True, bf16=False, report_to="none", dataloader_num_workers=0)
    text = Dataset.from_list([{k: pairs[i][k] for k in ("prompt", "chosen", "rejected")} for i in range(len(pairs))])
    trainer = CPOTrainer(model=AutoModelForCausalLM.from_pretrained(root / "policy"), args=args,
                         train_dataset=text, processing_class=tokenizer)
    batch = {}
    for side in ("chosen", "rejected"):  # CPO's batch layout, from dpolab's token ids
        ids = [list(pairs[i]["prompt_ids"]) + list(pairs[i][f"{side}_ids"]) for i in range(len(pairs))]
        width = max(map(len, ids))
        batch[f"{side}_input_ids"] = torch.tensor([s + [50256] * (width - len(s)) for s in ids])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
        batch[f"{side}_labels"] = torch.tensor([[-100] * len(pairs[i]["prompt_ids"]) + list(pairs[i][f"{side}_ids"])
                                                + [-100] * (width - len(s)) for i, s in enumerate(ids)])
    trainer.model.eval()
    with torch.no_grad():
        loss, theirs = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="eval")
    PARITY_TABLE.append(("simpo (CPOTrainer)", loss.item(), ours["loss"]))
    assert abs(ours["loss"] - loss.item()) <= 1e-4, (ours["loss"], loss.item())
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert abs(ours[key] - theirs[f"eval_{key}"]) <= 1e-4, (key, ours[key], theirs[f"eval_{key}"])


def test_rdpo_alpha_reaches_evaluate_and_is_the_papers_loss_by_hand(family, monkeypatch):
    """`--rdpo-alpha 0.02`: -log sigma(beta h + alpha (|y_w| - |y_l|)), recomputed here from the
    log-probs dpolab scores for policy and reference (R-DPO is no TRL DPOTrainer option)."""
    from transformers import AutoModelForCausalLM

    root, tokenizer, pairs = family
    ours = evaluate_cli(root, ["--rdpo-alpha", "0.02"], monkeypatch, "rdpo")
    collate = PreferenceCollator(50256)
    policy_chosen, policy_rejected = score_pairs(AutoModelForCausalLM.from_pretrained(root / "policy"), pairs,
                                                 collate, batch_size=8, chunk_size=128)
    ref_chosen, ref_rejected = score_pairs(AutoModelForCausalLM.from_pretrained(root / "reference"), pairs,
                                           collate, batch_size=8, chunk_size=128)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    length_difference = torch.tensor([len(p["chosen_ids"]) - len(p["rejected_ids"]) for p in pairs], dtype=torch.float32)
    assert length_difference.abs().min() > 0  # every pair's term is really there
    by_hand = -torch.nn.functional.logsigmoid(BETA * h + 0.02 * length_difference).mean().item()
    PARITY_TABLE.append(("rdpo (by hand)", by_hand, ours["loss"]))
    assert abs(ours["loss"] - by_hand) <= 1e-4, (ours["loss"], by_hand)
    plain = -torch.nn.functional.logsigmoid(BETA * h).mean().item()
    assert abs(ours["loss"] - plain) > 1e-3
