"""A tiny random instruct model with a ChatML chat template, built offline (no downloads here):
the bundled GPT-2 tokenizer plus ``<|im_start|>`` / ``<|im_end|>`` special tokens and a template
string, and a 2-layer Qwen2 sized to that vocabulary, saved to a folder like any Hub model.

The template is ChatML that ends a turn with ``<|im_end|>`` and nothing after it (as Llama 3's
does with ``<|eot_id|>``), so an answer's last token is the end-of-turn token.
"""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for m in messages %}{% if not loop.first %}\n{% endif %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}")


def build_chat_model(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpolab.model import load_tokenizer

    tokenizer = load_tokenizer("tiny-gpt2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
