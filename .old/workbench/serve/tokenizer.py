"""Text ↔ token ids for the server: a `tokenizers` tokenizer.json, the chat template
(jinja2, sandboxed as `transformers` does), and incremental detokenisation with stop strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


class TextTokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            raise WorkbenchError(f"tokenizer: {str(path)!r} has no tokenizer.json (prompts must then be token ids)")
        self.tok = Tokenizer.from_file(str(f))
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        self._compiled: Any = None

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise WorkbenchError("messages: this model's tokenizer has no chat template (use /v1/completions)")
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise WorkbenchError(f"messages: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return str(self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or ""))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(self.apply_chat_template(messages), special=False)


class Detokenizer:
    """Text of a growing id list, chunk by chunk, cut at the first stop string.

    Holds back a trailing partial UTF-8 character and any tail that could still become a stop
    string, so streamed text never shows what a stop string removes.
    """

    def __init__(self, tok: TextTokenizer | None, stop: tuple[str, ...] = ()) -> None:
        self.tok, self.stop = tok, stop
        self.ids: list[int] = []
        self.sent = 0          # characters of the text already returned
        self.stopped = False
        self.text = ""

    def add(self, ids: tuple[int, ...] | list[int], final: bool = False) -> str:
        """New text to emit after appending `ids`; `stopped` turns true at a stop string."""
        if self.tok is None:
            return ""
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            text = text[:-1]
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        limit = len(text)
        if not (final or self.stopped) and self.stop:
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            limit -= hold
        out = text[self.sent:limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
        return out
