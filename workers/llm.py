"""Offline batch generation, shaped like vLLM's `LLM` for its users."""

import itertools
from collections.abc import Sequence as Seq

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.outputs import RequestOutput
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


class LLM:
    def __init__(self, model: str, **engine_options):
        self.engine = start_engine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt together; outputs come back in the prompts' order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(request_id, _prompt_input(prompt), p)
        except ValueError:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]
