"""The rewrite prompt: one template shared by zero-shot rewriting, training and the example.

A tuned rewriter was trained on exactly the text this module builds, so search, eval
and `grape train` all call `render_prompt` rather than formatting prompts themselves.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from grape_cli.errors import InputError

DEFAULT_SYSTEM = (
    "You rewrite image search queries for a CLIP image retriever. Reply with one short "
    "English caption, in the style of an image's alt text, that describes what the "
    "wanted image shows. No explanation, no quotes, one line."
)
DEFAULT_USER = "Query: {query}"
# A vision-language rewriter also reads a composed query's reference image.
VISION_SYSTEM = (
    "You rewrite image search queries for a CLIP image retriever. A query may come with a "
    "reference image: then it asks for an image like the reference, changed as the query "
    "says. Reply with one short English caption, in the style of an image's alt text, that "
    "describes the wanted image. No explanation, no quotes, one line."
)
# Longest rewrite in tokens: a caption fits, a runaway generation is cut.
DEFAULT_MAX_NEW_TOKENS = 48


@dataclass(frozen=True)
class PromptTemplate:
    """A chat prompt: a system message and a user message with a `{query}` slot."""

    system: str = DEFAULT_SYSTEM
    user: str = DEFAULT_USER

    def __post_init__(self):
        if "{query}" not in self.user:
            raise InputError(
                "the prompt's user message has no {query} placeholder",
                "add {query} where the user's query goes",
            )

    def messages(self, query: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return [*msgs, {"role": "user", "content": self.user.replace("{query}", query)}]

    def vision_messages(self, query: str, image: bool) -> list[dict]:
        """`messages` in a vision-language processor's structured form, with an image
        placeholder before the user's text when there is a reference image: exactly what
        TRL's GRPOTrainer builds from `messages` and an `image` column, so a rewriter sees
        at search time the prompt it was trained on."""
        out = []
        for m in self.messages(query):
            parts = [{"type": "text", "text": m["content"]}]
            if image and m["role"] == "user":
                parts.insert(0, {"type": "image"})
            out.append({"role": m["role"], "content": parts})
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def default(cls, vision: bool = False) -> PromptTemplate:
        """The default prompt of a text rewriter, or of a vision-language one."""
        return cls(system=VISION_SYSTEM) if vision else cls()

    @classmethod
    def from_dict(cls, d: dict | None) -> PromptTemplate:
        return cls(**d) if d else cls()

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTemplate:
        """A JSON file {"system": ..., "user": ...}, or plain text used as the user message."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return cls(user=text.strip())
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object with 'system' and 'user'")
        return cls(system=data.get("system", DEFAULT_SYSTEM), user=data.get("user", DEFAULT_USER))


def render_prompt(tokenizer, template: PromptTemplate, query: str) -> str:
    """The exact text the LM sees: the chat template if it has one, else plain text."""
    msgs = template.messages(query)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in msgs) + "\n\nCaption:"


_QUOTES = "\"'`“”‘’「」"


def clean_rewrite(text: str) -> str:
    """One clean line from a generation: first non-empty line, no quotes or labels.

    >>> clean_rewrite('  "a red circle on the left"\\nSure! Anything else?')
    'a red circle on the left'
    >>> clean_rewrite("Caption: a dog on a beach")
    'a dog on a beach'
    >>> clean_rewrite("\\n\\n")
    ''
    """
    for line in text.splitlines():
        line = line.strip()
        if line:
            line = re.sub(r"^(caption|rewrite|query|answer)\s*:\s*", "", line, flags=re.I)
            return line.strip(_QUOTES + " ").strip()
    return ""
