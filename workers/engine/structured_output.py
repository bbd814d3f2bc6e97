"""Structured outputs at decode time, on xgrammar: specs compiled against one tokenizer's
vocabulary off the caller's thread (a bounded cache of futures, keyed by the spec's hash), a
matcher per sequence that says which tokens may come next, and the one tensor operation that
masks the others out of a batch's logits.

The engine owns a `GrammarCompiler` and a `StructuredMatcher` per constrained sequence; each
step it fills the bitmask rows of those sequences (`fill_bitmask_rows`), the sampler masks
the logits (`apply_token_bitmask`) before any sampling rule, and the engine feeds each sampled
token back to its matcher (`accept`).
"""

import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xgrammar

from kvserve.workers.engine.structured_spec import StructuredOutputError, StructuredOutputSpec

DEFAULT_CACHE_SIZE = 256  # compiled grammars kept per tokenizer


@dataclass(frozen=True)
class CompiledStructure:
    """A spec compiled for one vocabulary, and how long compiling it took."""

    grammar: xgrammar.CompiledGrammar
    compile_s: float


class StructuredMatcher:
    """Where one sequence stands in its grammar; before it, the free output up to the token
    `awaiting` (`StructuredOutputSpec.after_token_id`), if the spec has one: from the start,
    or only if the first token is `opener` (`opened_by_token_id`), which until then is allowed
    beside the grammar's first tokens."""

    def __init__(self, compiled: CompiledStructure, awaiting: int | None = None, opener: int | None = None):
        self._matcher = xgrammar.GrammarMatcher(compiled.grammar)
        self.awaiting = awaiting if opener is None else None
        self._undecided = (opener, awaiting) if opener is not None else None  # (opener, awaiting) until a first token

    @classmethod
    def for_spec(cls, compiled: CompiledStructure, spec: StructuredOutputSpec) -> "StructuredMatcher":
        return cls(compiled, spec.after_token_id, spec.opened_by_token_id)

    @property
    def active(self) -> bool:
        """Whether the grammar holds for the next token."""
        return self.awaiting is None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (call only while `active`)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._undecided is not None:
            allow_token(bitmask, row, self._undecided[0])

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False (and no change) when the grammar does not allow it.
        While the awaited token has not come, any token is taken, and that one ends the wait."""
        if self._undecided is not None:
            (opener, awaiting), self._undecided = self._undecided, None
            if token_id == opener:
                self.awaiting = awaiting
                return True
        if self.awaiting is not None:
            if token_id == self.awaiting:
                self.awaiting = None
            return True
        return self._matcher.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (drafts a verifier rejected)."""
        self._matcher.rollback(num_tokens)

    def is_terminated(self) -> bool:
        """The output is complete and a stop token was accepted: nothing may follow."""
        return self._matcher.is_terminated()


class GrammarCompiler:
    """Compiles specs for one tokenizer on a background thread. `compile` returns a future
    at once; the same spec (by key) gets the same future, so each distinct spec is compiled
    once while it stays among the `cache_size` most recently asked for. A spec whose grammar
    fails to compile gives a future that raises StructuredOutputError.

    Call it from one thread (the engine's): the cache is not locked."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 cache_size: int = DEFAULT_CACHE_SIZE):
        """`vocab_size` is the model's (the width of its logits), which may exceed the
        tokenizer's; `stop_token_ids` are the tokens that end a sequence (EOS and the like),
        the only ones a complete output allows."""
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        # One cache only, ours: bounded by count and keyed by the spec, not by grammar text.
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[str, Future[CompiledStructure]] = OrderedDict()
        self.cache_size = cache_size
        self.vocab_size = vocab_size

    def compile(self, spec: StructuredOutputSpec) -> Future[CompiledStructure]:
        key = spec.key()
        future = self._cache.get(key)
        if future is None:
            future = self._cache[key] = self._executor.submit(self._compile, spec)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return future

    def _compile(self, spec: StructuredOutputSpec) -> CompiledStructure:
        start = time.perf_counter()
        grammar = spec.to_grammar()
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except RuntimeError as error:
            raise StructuredOutputError.from_native(spec.description, error) from None
        return CompiledStructure(compiled, time.perf_counter() - start)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def allow_token(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    """Set `token_id`'s bit in `bitmask[row]` (bit `token_id % 32` of int32 word `token_id // 32`)."""
    bit = 1 << (token_id % 32)
    bitmask[row, token_id // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit


def new_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask for `num_rows` rows of logits: int32, one bit per token, all allowed."""
    return xgrammar.allocate_token_bitmask(num_rows, vocab_size)


def fill_bitmask_rows(bitmask: torch.Tensor, matchers: Iterable[tuple[int, StructuredMatcher]]) -> float:
    """Fill the row of each (row, matcher); returns the seconds it took (the step's mask time)."""
    start = time.perf_counter()
    for row, matcher in matchers:
        matcher.fill_bitmask(bitmask, row)
    return time.perf_counter() - start


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in one operation, each logit of `rows` whose bit in the same row of
    `bitmask` is clear; other rows are left as they are. `logits` (on any device) is as wide
    as the compiler's `vocab_size`."""
    if not rows:
        return
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
