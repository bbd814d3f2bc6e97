"""Offline batch generation, shaped like vLLM's `LLM` for its users."""

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence as Seq

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.outputs import EmbeddingOutput, RequestOutput
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.runner import start_engine

Prompt = str | list[int] | dict


def _prompt_input(prompt: Prompt) -> str | list[int]:
    """A prompt is text, token ids, or vLLM's `{"prompt": ...}` / `{"prompt_token_ids": ...}`."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        return prompt["prompt"]
    return prompt


def _prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


class LLM:
    def __init__(self, model: str, **engine_options):
        self.engine = start_engine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        lora: str | None | Seq[str | None] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt together; outputs come back in the prompts' order. `lora`
        names the LoRA adapter (of `lora_modules`) of every prompt, or of each one (None: the base)."""
        prompts = _prompt_list(prompts)
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        adapters = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(adapters) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(adapters)} LoRA adapter names")
        ids = self._add_all(prompts, lambda request_id, prompt, i: self.engine.add_request(
            request_id, prompt, params[i], lora_name=adapters[i]))
        finished: dict[str, RequestOutput] = {}
        with self._aborted_on_failure(ids):
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        return [finished[i] for i in ids]

    def embed(self, prompts: Prompt | Seq[Prompt]) -> list[EmbeddingOutput]:
        """The embedding of every prompt (pooled as the engine's `pooling` setting says), in order."""
        ids = self._add_all(_prompt_list(prompts), lambda request_id, prompt, _: self.engine.add_embedding_request(
            request_id, prompt))
        finished: dict[str, EmbeddingOutput] = {}
        with self._aborted_on_failure(ids):
            while self.engine.has_unfinished_requests():
                self.engine.step()
                finished.update((e.request_id, e) for e in self.engine.take_embeddings())
        return [finished[i] for i in ids]

    @contextlib.contextmanager
    def _aborted_on_failure(self, ids: list[str]) -> Iterator[None]:
        """If adding or stepping raises (a request refused, or failed midway), none of `ids` stays
        behind in the engine, nor an embedding of theirs that the failing step finished."""
        try:
            yield
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            self.engine.take_embeddings()
            raise

    def _add_all(self, prompts: list[Prompt], add: Callable[[str, str | list[int], int], None]) -> list[str]:
        """Each prompt's request id, once `add(request_id, prompt, index)` queued them all; if one
        is refused (ValueError), none stays queued."""
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        with self._aborted_on_failure(ids):
            for i, (request_id, prompt) in enumerate(zip(ids, prompts)):
                add(request_id, _prompt_input(prompt), i)
        return ids
