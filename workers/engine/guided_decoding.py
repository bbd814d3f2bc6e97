"""The engine's side of structured outputs: the grammars of the requests that ask for one,
compiled off the step loop, and each step's token masks for the samples that follow one."""

import dataclasses
from concurrent.futures import Future

from kvserve.workers.engine.executor import SampleRequest, TokenMasks
from kvserve.workers.engine.outputs import GrammarTimings
from kvserve.workers.engine.structured_output import (
    CompiledStructure, GrammarCompiler, fill_bitmask_rows, new_bitmask,
)
from kvserve.workers.engine.structured_spec import StructuredOutputError, StructuredOutputSpec


class GuidedDecoding:
    """Guided requests from `add` until `forget`. The compiler (and its thread) is made for the
    first one: an engine that never sees a grammar never pays for it."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self._compiler: GrammarCompiler | None = None
        self._compiling: dict[str, Future[CompiledStructure]] = {}
        self.num_requests = 0
        self.timings = GrammarTimings(compiled=0, compile_s=0.0, masked_steps=0, mask_s=0.0)

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def add(self, request_id: str, spec: StructuredOutputSpec) -> None:
        if self._compiler is None:
            self._compiler = GrammarCompiler(self._tokenizer, self._vocab_size, self._stop_token_ids)
        self.num_requests += 1
        self._compiling[request_id] = self._compiler.compile(spec)

    def take_compiled(self) -> list[tuple[str, CompiledStructure | StructuredOutputError]]:
        """The requests whose grammar has compiled since the last call, or failed to."""
        done = [(request_id, future) for request_id, future in self._compiling.items() if future.done()]
        results = []
        for request_id, future in done:
            del self._compiling[request_id]
            try:
                compiled = future.result()
            except StructuredOutputError as error:
                results.append((request_id, error))
                continue
            t = self.timings
            self.timings = dataclasses.replace(t, compiled=t.compiled + 1, compile_s=t.compile_s + compiled.compile_s)
            results.append((request_id, compiled))
        return results

    def forget(self, request_id: str) -> None:
        self.num_requests -= 1
        self._compiling.pop(request_id, None)

    def token_masks(self, samples: list[SampleRequest]) -> TokenMasks | None:
        """The tokens each sample whose grammar holds may take next."""
        guided = [(row, s.seq.matcher) for row, s in enumerate(samples)
                  if s.seq.matcher is not None and s.seq.matcher.active]
        if not guided:
            return None
        bitmask = new_bitmask(len(samples), self._vocab_size)
        mask_s, t = fill_bitmask_rows(bitmask, guided), self.timings
        self.timings = dataclasses.replace(t, masked_steps=t.masked_steps + 1, mask_s=t.mask_s + mask_s)
        return TokenMasks(bitmask, [row for row, _ in guided])

    def timings_so_far(self) -> GrammarTimings | None:
        """The timings, or None while no request has asked for a grammar."""
        return self.timings if self._compiler is not None else None

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
