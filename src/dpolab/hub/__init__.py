"""Publishing: export a run (or a sweep's best trial) as a standard Hugging Face model folder with a
model card, and push that folder to the Hub.

    export.py  run/sweep folder -> HF folder (weights, config, generation config, tokenizer, card, plots)
    card.py    the model card (``huggingface_hub.ModelCard``) built from the run records
    push.py    create_repo + one upload_folder commit, with one-line errors
    cli.py     ``dpolab export`` / ``dpolab push`` subcommands
"""
