"""Where a dpolab training step spends its time: torch.profiler over a few steps on real pairs.

    python benchmarks/profile_step.py --model gpt2-124m-random --batch 2 --steps 3

One step = policy forward on the (2B, T) batch, answer-only chunked LM head, DPO loss on cached
reference log-probs, backward, AdamW step: what DpolabTrainer.training_step does, without Trainer.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from dpolab.allocator import cap_kernel_cache
from dpolab.config import TrainConfig
from dpolab.data import prepare_data
from dpolab.model import disable_dropout, load_model, load_tokenizer, use_fused_gelu
from dpolab.precision import MasterWeightAdamW
from dpolab.scoring.collate import PreferenceCollator, batch_tokens, choose_packed
from dpolab.scoring.logps import concatenated_forward
from dpolab.scoring.loss import preference_loss

logger = logging.getLogger("profile_step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--python-gelu", action="store_true", help="keep GPT-2's stock Python GELU")
    parser.add_argument("--shapes", action="store_true", help="also group by input shapes")
    parser.add_argument("--layout", choices=["auto", "packed", "padded"], default="auto",
                        help="batch layout (TrainConfig.batch_layout; auto packs on CPU)")
    parser.add_argument("--dtype", choices=["fp32", "bf16-autocast", "bf16"], default="fp32",
                        help="bf16-autocast: fp32 weights under CPU autocast (Trainer's bf16=True); "
                        "bf16: bf16 weights, fp32 master copy in the optimizer (dpolab's CPU bf16)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    cap_kernel_cache()  # as dpolab's CPU stage setup does

    config = TrainConfig(model=args.model, max_train_pairs=args.batch * (args.steps + 1), max_eval_pairs=1,
                         cache_dir=tempfile.mkdtemp(prefix="dpolab-prof-"), seed=0)
    tokenizer = load_tokenizer(args.model)
    pairs = prepare_data(config, tokenizer)[0]["train"]
    model = load_model(args.model)
    disable_dropout(model)
    model.train()
    if not args.python_gelu:
        use_fused_gelu(model)  # as the dpolab engine does
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)  # Trainer's default on torch >= 2.8
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
        optimizer = MasterWeightAdamW(model.parameters(), lr=5e-5, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16-autocast")
    collate = PreferenceCollator(tokenizer.pad_token_id, packed=choose_packed(args.layout, "cpu", model))
    batches = [collate([pairs[i] for i in range(s * args.batch, (s + 1) * args.batch)]) for s in range(args.steps + 1)]

    def step(batch) -> None:
        with autocast:
            chosen, rejected = concatenated_forward(model, batch)  # (B,), (B,)
        losses, _, _ = preference_loss(chosen, rejected, chosen.detach() - 1, rejected.detach() + 1, beta=0.1)
        losses.mean().backward()
        if isinstance(optimizer, MasterWeightAdamW):  # as DpolabTrainer clips with bf16 weights
            optimizer.clip_master_grads(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up: allocator, optimizer state
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for batch in batches[1:]:
            step(batch)
    tokens = sum(batch_tokens(b) for b in batches[1:])
    answer = sum(int(b["answer_mask"].sum()) for b in batches[1:])
    print(f"model {args.model}, {args.dtype}, {'packed' if collate.packed else 'padded'} batches, "
          f"{args.steps} steps of {args.batch} pairs, {tokens} tokens "
          f"({answer} answer tokens), threads {torch.get_num_threads()}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.shapes:
        events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{'op':38s} {'self ms':>9s} {'share':>6s} {'calls':>5s}  input shapes")
        for event in events[: args.rows]:
            print(f"{event.key[:38]:38s} {event.self_cpu_time_total / 1e3:9.1f} "
                  f"{event.self_cpu_time_total / total:6.1%} {event.count:5d}  {str(event.input_shapes)[:100]}")


if __name__ == "__main__":
    main()
