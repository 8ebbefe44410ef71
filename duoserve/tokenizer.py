"""Tokenizer (tokenizer.json via `tokenizers`), chat template (jinja2 sandbox), eos ids."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer file we cannot use; the message names the file."""


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


class Tokenizer:
    """Encode/decode text, render chat prompts, and know the model's eos ids."""

    def __init__(
        self,
        hf_tokenizer: HFTokenizer,
        tokenizer_config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        config_eos_ids: tuple[int, ...] = (),
    ) -> None:
        self._tok = hf_tokenizer
        tok_cfg = tokenizer_config or {}
        self.bos_token = _token_str(tok_cfg.get("bos_token"))
        self.eos_token = _token_str(tok_cfg.get("eos_token"))
        self.chat_template = chat_template
        self.generation_config = generation_config or {}
        self.eos_token_ids = self._eos_ids(config_eos_ids)

    @classmethod
    def from_dir(cls, model_dir: str | Path, config_eos_ids: tuple[int, ...] = ()) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: not found (duoserve needs a fast tokenizer.json)")
        try:
            hf_tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot be parsed ({exc})") from exc
        cfg_path = model_dir / "tokenizer_config.json"
        tok_cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        gen_path = model_dir / "generation_config.json"
        gen_cfg = _read_json(gen_path) if gen_path.is_file() else {}
        template = cls._find_chat_template(model_dir, tok_cfg)
        return cls(hf_tok, tok_cfg, gen_cfg, template, config_eos_ids)

    @staticmethod
    def _find_chat_template(model_dir: Path, tok_cfg: dict[str, Any]) -> str | None:
        jinja_path = model_dir / "chat_template.jinja"
        if jinja_path.is_file():
            return jinja_path.read_text()
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def _eos_ids(self, config_eos_ids: tuple[int, ...]) -> tuple[int, ...]:
        ids: list[int] = []
        eos = self.generation_config.get("eos_token_id")
        for source in (eos if isinstance(eos, list) else [eos], list(config_eos_ids)):
            ids.extend(int(i) for i in source if isinstance(i, int))
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            ids.append(self._tok.token_to_id(self.eos_token))
        return tuple(dict.fromkeys(ids))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render messages with the model's chat template in a jinja2 sandbox."""
        if self.chat_template is None:
            raise TokenizerError(
                "this model has no chat template (tokenizer_config.json or chat_template.jinja)"
            )
        try:
            template = _sandbox().from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=None,
            )
        except TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template writes special tokens itself (bos included), so add none here.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _sandbox() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    return env
