"""What the engine hands back after each step, per request."""

from dataclasses import dataclass, field


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely tokens and their logprobs


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # of every token so far; of the delta's in a stream
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    delta_text: str = ""  # what this step added
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass(frozen=True)
class EngineStats:
    """The engine's load and KV pool, as the replica publishes it to the routers."""

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int  # held by running or waiting-to-resume sequences
    kv_blocks_cached: int  # reusable prefix blocks, in use or not
    num_preemptions: int
    grammars: "GrammarTimings | None"  # structured outputs so far, once there were any


@dataclass(frozen=True)
class EmbeddingOutput:
    """A prompt's embedding: its pooled final hidden states (see `pooling.py`)."""

    request_id: str
    embedding: list[float]
    num_prompt_tokens: int
    num_cached_tokens: int  # of the prompt, read from the prefix cache


@dataclass(frozen=True)
class GrammarTimings:
    """Time spent on structured outputs since the engine started: compiling grammars, and
    filling the steps' token masks."""

    compiled: int
    compile_s: float
    masked_steps: int
    mask_s: float
