"""The HH-RLHF dialogue format: one home for what every stage must agree on.

Training splits each dialogue at its last :data:`ASSISTANT` marker, serve builds prompts with the
same markers and stops at the next :data:`HUMAN` turn, the model card documents them; the dataset
names are what ``--dataset`` accepts and the card links to; :data:`SAMPLING` is how models trained
on it are sampled (the export's generation config, ``dpolab evaluate``, the web app).
"""

from __future__ import annotations

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
PROMPT_FORMAT = HUMAN + " {message}" + ASSISTANT  # one user turn, ready for the model to answer

HUB_ID = "Anthropic/hh-rlhf"
SAMPLE_NAME = "hh-rlhf-sample"  # the bundled real sample ...
SAMPLE_SUBSET = "harmless-base"  # ... is this subset's test split

# Some diversity, but a low enough temperature and a repetition penalty that GPT-2-sized models do
# not loop; max_new_tokens bounds one assistant turn.
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1, "max_new_tokens": 128}
