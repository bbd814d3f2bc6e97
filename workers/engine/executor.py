"""What the engine needs from whatever runs the model: one declared interface that the
in-process `ModelRunner` and the tensor-parallel `TPExecutor` (both in `workers/runner/`)
implement. The engine is handed one; it never builds it."""

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvserve.workers.engine.outputs import TokenLogprobs
from kvserve.workers.engine.scheduler import ScheduledBatch
from kvserve.workers.engine.sequence import Sequence
from kvserve.workers.models.config import ModelConfig


@dataclass(slots=True)
class SampleRequest:
    """Sample `seq`'s next token from the logits of the last new token of `batch_index`."""

    batch_index: int
    seq: Sequence


@dataclass(slots=True)
class TokenMasks:
    """The tokens that the sample rows `rows` may take this step (structured outputs): one bit
    per token in `bitmask[row]`, int32 words of 32 tokens, for every sample row (those not in
    `rows` are left unread)."""

    bitmask: torch.Tensor
    rows: list[int]


@dataclass(slots=True)
class StepRequest:
    """One step for an executor: the scheduled batch, every sequence's block table, which
    sequences sample (the sample rows, in order), the model's end tokens, the allowed tokens
    of rows whose output follows a grammar, and the batch indices of the embedding prompts
    whose chunks are pooled. With `speculative`, a sample whose sequence has proposed tokens
    (`seq.draft_token_ids`, scheduled after its own) samples each of their positions too: its
    1 + k rows follow one another in the output, in the order of the positions."""

    batch: ScheduledBatch
    block_tables: dict[str, list[int]]
    samples: list[SampleRequest]
    eos_token_ids: tuple[int, ...]
    token_masks: TokenMasks | None = None
    pooled: list[int] = field(default_factory=list)
    speculative: bool = False
    prompt_scored: list[int] = field(default_factory=list)  # batch indices of prompts whose logprobs are wanted


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # NO_TOKEN where a row's logits left nothing to draw
    # For rows whose params ask for logprobs, else None: the sampled token's logprob, and the
    # `params.logprobs` most likely (token id, logprob) pairs, most likely first.
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    pooled: torch.Tensor | None = None  # [len(step.pooled), hidden] float32 on the CPU
    # Per entry of `step.prompt_scored`: the logprobs of the prompt tokens that its chunk's
    # positions predict (the one after each position, up to the prompt's last).
    prompt_logprobs: list[list[TokenLogprobs]] | None = None


# A sampled row's token where its logits left nothing to draw from: NaN, an infinite largest
# logit, or every logit -inf (a numerically broken model). The engine fails that request alone.
NO_TOKEN = -2


class PendingSample(Protocol):
    """A step launched on the device whose sampled tokens the host has not read yet."""

    def result(self) -> SamplerOutput:
        """Wait for the step and read its tokens."""


class ModelExecutor(Protocol):
    model_config: ModelConfig
    num_kv_blocks: int  # the KV pool the model's cache tensors hold, in blocks

    def execute(self, step: StepRequest) -> SamplerOutput | None:
        """Run one step's forward pass and sample the rows of `step.samples`."""

    def launch(self, step: StepRequest, previous: PendingSample | None) -> PendingSample:
        """Queue one step without waiting for it (async scheduling; only executors that run the
        model in the engine's process have it). A sequence whose new token is PENDING_TOKEN
        takes it from `previous`, at its `sample_row`."""

    def add_lora(self, name: str, folder: str) -> None:
        """Serve LoRA adapter `name` from `folder` (ValueError if it does not fit the model);
        only executors of `enable_lora` engines."""

    def remove_lora(self, name: str) -> None:
        """Forget LoRA adapter `name`, which no request uses any more."""

    def resident_loras(self) -> tuple[str, ...]:
        """The LoRA adapters in device slots now, least recently used first."""

    async def check_health(self) -> None:
        """Raise if the model can no longer run (a rank is gone)."""

    def shutdown(self) -> None:
        """Release what the executor holds beyond this process (actors, placement groups)."""
