"""Tokenizer and chat template, from a Hugging Face ``tokenizer.json`` or from GGUF metadata.

GGUF files of byte-level BPE models (``tokenizer.ggml.model == "gpt2"``) carry the vocabulary,
the merges, token types and a pre-tokenizer name; we rebuild an equivalent ``tokenizers``
pipeline from them. The chat template (Jinja) is rendered in a sandbox.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Pre-tokenizer regexes by GGUF ``tokenizer.ggml.pre`` name.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    # name: (split digits one by one first, regex or None for the byte-level default)
    "default": (False, None),
    "gpt2": (False, None),
    "smollm": (True, None),
    "starcoder": (True, None),
    "refact": (True, None),
    "llama-bpe": (False, _LLAMA3_RE),
    "llama3": (False, _LLAMA3_RE),
    "qwen2": (False, _QWEN2_RE),
}
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """Text <-> token ids, special ids and the chat template for one model."""

    def __init__(self, backend: Any, *, bos_token_id: int | None, eos_token_id: int | None,
                 add_bos: bool, chat_template: str | None, extra_eos_ids: tuple[int, ...] = ()) -> None:
        self.backend = backend  # a tokenizers.Tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # every id that ends a sequence (e.g. Llama-3's <|eot_id|> beside <|end_of_text|>)
        ids = ((eos_token_id,) if eos_token_id is not None else ()) + tuple(extra_eos_ids)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def template_renders_tools(self) -> bool:
        """Does the chat template use a ``tools`` variable (else tools go in a system message)?"""
        return bool(self.chat_template) and "tools" in self.chat_template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) with the model's template;
        ``tools`` (OpenAI function definitions) are passed to templates that render them."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        tok = self.backend.id_to_token
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok(self.bos_token_id) if self.bos_token_id is not None else "",
            eos_token=tok(self.eos_token_id) if self.eos_token_id is not None else "",
            **({"tools": tools} if tools is not None else {}),
        )

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # the rendered template already holds any BOS it wants
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def tokenizer_from_gguf_fields(fields: dict[str, Any]) -> Tokenizer:
    """Build a tokenizer from GGUF metadata values (already decoded to Python objects)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(_PRE_TOKENIZERS)}")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split_digits, regex = _PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type") or []
    specials = [tokens[i] for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    tk.add_special_tokens(specials)
    return Tokenizer(
        tk,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
        extra_eos_ids=tuple(fields[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in fields),
    )


def tokenizer_from_hf_dir(path: Path, config: dict[str, Any]) -> Tokenizer:
    """Load ``tokenizer.json`` plus special ids and chat template from an HF model directory."""
    from tokenizers import Tokenizer as HFTokenizer

    tj = path / "tokenizer.json"
    if not tj.exists():
        raise ValueError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
    backend = HFTokenizer.from_file(str(tj))
    tcfg = _read_json(path / "tokenizer_config.json")
    gen = _read_json(path / "generation_config.json")
    template = tcfg.get("chat_template")
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)

    def tok_id(name: str) -> int | None:
        tok = tcfg.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return backend.token_to_id(tok) if tok else None

    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    all_eos = tuple(eos) if isinstance(eos, list) else ()
    eos = all_eos[0] if all_eos else eos
    eos = eos if isinstance(eos, int) else tok_id("eos_token")
    bos = config.get("bos_token_id")
    bos = bos if isinstance(bos, int) else tok_id("bos_token")
    # tokenizer.json's post-processor adds BOS itself when the model wants one
    return Tokenizer(backend, bos_token_id=bos, eos_token_id=eos, add_bos=False, chat_template=template,
                     extra_eos_ids=all_eos[1:])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}
