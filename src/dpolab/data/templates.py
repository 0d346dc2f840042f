"""Conversation -> text: the ONE formatting used by training, evaluation and ``dpolab serve``.

A model is prompted the way it was trained only if both sides render a conversation with the same
code, so training, the web app's chat, ``/v1/chat/completions`` and preference capture all go
through :class:`Formatter`:

* ``hh`` (GPT-2 and other template-less models): HH-RLHF's text format,
  ``\\n\\nHuman: ...\\n\\nAssistant: ...``; the prompt ends with ``\\n\\nAssistant:`` and an answer
  follows it after one space. A system message has no HH equivalent; it goes first as plain text.
* a Jinja chat template (instruct models; the tokenizer's own, or a ``.jinja`` file):
  ``apply_chat_template`` with the generation prompt on the prompt side; an answer is what the
  template adds after that prompt, so its end-of-turn token is part of the answer.

Which one a run uses (``chat_template`` setting): ``auto`` picks the tokenizer's template when it
has one, else ``hh``; ``hh``, ``tokenizer`` or a path force it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpolab.errors import ConfigError
from dpolab.hh import ASSISTANT, HUMAN

ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"(\n\nHuman:|\n\nAssistant:)")

Message = dict[str, str]


def hh_to_messages(text: str) -> list[Message]:
    """An HH dialogue (or prompt) as messages, turn by turn; text before the first turn is a system
    message. A trailing empty ``\\n\\nAssistant:`` (a prompt's generation cue) gives no message."""
    parts = _HH_TURN.split(text)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for marker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if marker == HUMAN else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"] and text.endswith(ASSISTANT):
        messages.pop()
    return messages


@dataclass(frozen=True)
class Formatter:
    """Renders conversations for one tokenizer. ``template`` None means the HH text format."""

    name: str  # "hh", "tokenizer" or the .jinja path: recorded in the data report and model card
    template: str | None = None
    tokenizer: Any = None

    @property
    def is_chat(self) -> bool:
        return self.template is not None

    def prompt(self, messages: list[Message]) -> str:
        """The conversation so far, ready for the model to write the assistant's next turn."""
        if self.template is None:
            parts = []
            for message in messages:
                content = message["content"].strip()
                if message["role"] == "system":
                    parts.append(content)
                else:
                    parts.append(f"{HUMAN if message['role'] == 'user' else ASSISTANT} {content}")
            return "".join(parts) + ASSISTANT
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)

    def full(self, messages: list[Message], answer: str) -> str:
        """Prompt and answer as one text: the prompt-side rendering is not always a prefix of it
        with a chat template, so tokenization compares ids (see ``tokenize.py``)."""
        if self.template is None:
            return self.prompt(messages) + self.answer(answer)
        return self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                                  chat_template=self.template, tokenize=False)

    def answer(self, answer: str) -> str:
        """The HH text of an answer as it follows ``\\n\\nAssistant:`` (one leading space)."""
        return " " + answer.strip()


def resolve_formatter(tokenizer: Any, setting: str = "auto") -> Formatter:
    """The formatter for ``setting`` ('auto', 'hh', 'tokenizer' or a ``.jinja`` path)."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is what chat clients use
        own = own.get("default")
    if setting == "hh" or (setting == "auto" and not own):
        return Formatter("hh")
    if setting in ("auto", "tokenizer"):
        if not own:
            raise ConfigError("chat_template: 'tokenizer' but the tokenizer has no chat template "
                              "(use 'hh' or a .jinja file)")
        return Formatter("tokenizer", own, tokenizer)
    path = Path(setting)
    if not path.is_file():
        raise ConfigError(f"chat_template: {setting!r} is not 'auto', 'hh', 'tokenizer' or an existing .jinja file")
    return Formatter(str(path), path.read_text(), tokenizer)


def bind_template(tokenizer: Any, setting: str = "auto") -> Formatter:
    """Resolve ``setting`` and make it the tokenizer's own template (none for HH), so the tokenizer
    saved with the trained model tells ``dpolab serve`` how the model was trained to see a chat."""
    formatter = resolve_formatter(tokenizer, setting)
    tokenizer.chat_template = formatter.template
    return formatter
