"""``dpolab export`` and ``dpolab push``: argparse subcommands registered by ``dpolab.cli``.

Heavy imports (torch, transformers, huggingface_hub) happen inside the handlers so ``dpolab --help``
stays fast. Handlers raise :class:`DpolabError` for user errors; the main CLI prints those as one
line and exits 2.
"""

from __future__ import annotations

import argparse

from dpolab.paths import user_path


def cmd_export(args: argparse.Namespace) -> int:
    from dpolab.hub.export import export

    result = export(args.source, args.out_dir, repo_id=args.repo_id, adapter_only=args.adapter_only)
    print(f"exported {result.run.path} to {result.out_dir} ({len(result.files)} files)")
    for rel in result.files:
        print(f"  {rel}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from dpolab.hub.push import format_plan, plan_push, push

    plan = plan_push(args.path, args.repo_id, private=args.private)
    if args.dry_run:
        try:
            print(format_plan(plan))
        finally:
            plan.close()
        return 0
    url = push(plan)
    print(f"pushed {len(plan.files)} files to {plan.repo_id}: {url}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a run (or a sweep's best trial) as a Hugging Face model folder with a model card",
        description="Write model.safetensors, config.json, generation_config.json, tokenizer files, README.md "
                    "(model card) and the sweep report's plots to OUT_DIR. Same input, byte-identical files.")
    p.add_argument("source", type=user_path, metavar="RUN_OR_SWEEP_DIR", help="a run folder, or a sweep folder (exports its best trial)")
    p.add_argument("out_dir", type=user_path, metavar="OUT_DIR", help="new or empty folder, or an earlier export to replace")
    p.add_argument("--repo-id", default=None, metavar="USER/NAME",
                   help="Hub repo id to show in the card's usage snippets (default: a USER/NAME placeholder)")
    p.add_argument("--adapter-only", action="store_true",
                   help="LoRA runs: export the PEFT adapter alone (MBs) instead of the merged model")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "push", help="upload an export (or a run/sweep, exported on the fly) to the Hugging Face Hub",
        description="Create the model repo if needed and upload the folder in one commit. Token: HF_TOKEN or "
                    "the cached `hf auth login`; endpoint: HF_ENDPOINT (default https://huggingface.co).")
    p.add_argument("path", type=user_path, metavar="EXPORT_OR_RUN_DIR", help="a `dpolab export` folder, a run folder or a sweep folder")
    p.add_argument("--repo-id", required=True, metavar="USER/NAME", help="target model repo on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    p.add_argument("--dry-run", action="store_true",
                   help="list every file and size and the card metadata; touch no network")
    p.set_defaults(func=cmd_push)
