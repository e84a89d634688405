"""xgrammar behind three calls.

- ``check(params)`` (front end, no tokenizer): parse the spec into a grammar, so a bad schema,
  regex or EBNF is a ``ValueError`` naming it before the request is accepted;
- ``GrammarCompilerPool.submit(params)`` (engine core): compile the grammar for the engine's
  tokenizer on worker threads, never on the engine loop; one future per ``params.key``, so
  concurrent requests with the same grammar share one compilation and later ones hit the cache;
- ``GrammarCompilerPool.matcher(compiled)``: a per-request matcher that fills bitmask rows,
  accepts sampled tokens and rolls back (speculative decoding).

xgrammar (and the transformers tokenizer wrapper it reads the vocabulary from) is imported
lazily: an engine that never sees a structured request never loads it.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fleetlm.structured.params import StructuredOutputsParams

MAX_WHITESPACE = 16  # blanks allowed between JSON elements unless compact JSON is asked for
MAX_CACHED_GRAMMARS = 256
_NATIVE_PREFIX = re.compile(r"^(\[[\d:]+\] )?\S+\.(cc|h):\d+: (Check failed: .*? is false: )?")


def xgrammar() -> Any:
    try:
        import xgrammar as xgr
    except ImportError as e:  # a dependency, but say what is missing rather than a bare ImportError
        raise ValueError(f"structured outputs need the xgrammar package ({e})") from None
    return xgr


def clean_error(e: BaseException) -> str:
    """The message of an xgrammar error without the C++ file and line it was raised at."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return _NATIVE_PREFIX.sub("", lines[0]) if lines else type(e).__name__


def build_grammar(p: StructuredOutputsParams) -> Any:
    """The ``xgrammar.Grammar`` of ``p`` (tokenizer-independent)."""
    xgr = xgrammar()
    ws = {"any_whitespace": not p.disable_any_whitespace,
          "max_whitespace_cnt": None if p.disable_any_whitespace else MAX_WHITESPACE}
    kind = p.kind
    if kind == "json":
        return xgr.Grammar.from_json_schema(p.json, strict_mode=p.strict, **ws)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, **ws)
    if kind == "regex":
        return xgr.Grammar.from_regex(p.regex)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in p.choice))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(p.grammar)
    return xgr.Grammar.from_structural_tag(p.structural_tag)


def check(p: StructuredOutputsParams) -> None:
    """``ValueError`` naming the kind and xgrammar's reason if ``p`` does not parse."""
    try:
        build_grammar(p)
    except ValueError as e:
        if "xgrammar package" in str(e):
            raise
        raise ValueError(f"structured_outputs.{p.kind} is invalid: {clean_error(e)}") from None
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError from C++
        raise ValueError(f"structured_outputs.{p.kind} is invalid: {clean_error(e)}") from None


@functools.lru_cache(maxsize=256)
def check_cached(p: StructuredOutputsParams) -> None:
    """``check`` once per distinct spec (errors are not cached: they raise every time)."""
    check(p)


def tokenizer_info(tokenizer: Any, vocab_size: int) -> Any:
    """xgrammar's view of our tokenizer: its vocabulary decoded, sized to the model's logits,
    stopping on every EOS id of the model."""
    from transformers import PreTrainedTokenizerFast

    xgr = xgrammar()
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=list(tokenizer.eos_token_ids))


class GrammarCompilerPool:
    """Compiles grammars for one tokenizer on ``max_workers`` threads (xgrammar releases the GIL
    while it builds token masks), keeping the newest ``MAX_CACHED_GRAMMARS`` results."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_workers: int = 1) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="fleetlm-grammar")
        self._futures: OrderedDict[tuple, Future] = OrderedDict()
        self._compiler = None
        self._lock = threading.Lock()
        self.num_compiled = 0
        self.num_cache_hits = 0

    def submit(self, p: StructuredOutputsParams) -> Future:
        fut = self._futures.get(p.key)
        if fut is not None and not (fut.done() and fut.exception() is not None):
            self._futures.move_to_end(p.key)
            self.num_cache_hits += 1
            return fut
        fut = self._pool.submit(self._compile, p)
        self._futures[p.key] = fut
        while len(self._futures) > MAX_CACHED_GRAMMARS:
            self._futures.popitem(last=False)
        return fut

    def _compile(self, p: StructuredOutputsParams) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = xgrammar()
                self._compiler = xgr.GrammarCompiler(tokenizer_info(self.tokenizer, self.vocab_size),
                                                     max_threads=1, cache_enabled=False)
        try:
            compiled = self._compiler.compile_grammar(build_grammar(p))
        except Exception as e:  # noqa: BLE001 - reported per request
            raise ValueError(f"structured_outputs.{p.kind} could not be compiled: {clean_error(e)}") from None
        self.num_compiled += 1
        return compiled

    def matcher(self, compiled: Any) -> Any:
        return xgrammar().GrammarMatcher(compiled)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
