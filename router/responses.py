"""Turns the engine's streamed chunks into OpenAI response bodies."""

import base64
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from kvserve.router.reasoning import ReasoningSplitter, ThinkingTokens
from kvserve.router.tool_parsers import NamedCallReader, ToolCallReader
from kvserve.workers.protocol import EmbeddingOutput, PromptLogprobs, TokenLogprobs


@dataclass
class ChoiceState:
    """What one choice (one prompt x one sample) has produced so far; `tool_calls` reads the
    tool calls out of its answer when the request has tools."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token that ended it
    tool_calls: ToolCallReader | NamedCallReader | None = None
    reasoning: ReasoningSplitter | None = None  # tells its thinking from its answer, for a reasoning model
    thinking_tokens: ThinkingTokens | None = None  # counts its thinking's tokens, where the tags are tokens
    streamed: bool = False  # whether a chunk of it has been sent


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int | None = None  # of the completion tokens, counted for a reasoning model's chat

    def to_dict(self) -> dict:
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage


def openai_finish_reason(reason: str | None, called_tools: bool = False) -> str | None:
    """A choice whose output ended by itself after calling tools finished with "tool_calls"."""
    if reason == "stop" and called_tools:
        return "tool_calls"
    return "stop" if reason == "abort" else reason


class TokenText:
    """Token strings for logprobs, decoded one token at a time (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


def token_id_text(token_id: int) -> str:
    """A token as vLLM's `return_tokens_as_token_ids` names it in logprobs."""
    return f"token_id:{token_id}"


def completion_logprobs(entries: list[TokenLogprobs], token_text: TokenText, text_start: int) -> dict:
    """The legacy completions format; an entry whose `logprob` is None (an echoed prompt's
    first token, which nothing predicts) has no logprob and no top tokens."""
    tokens = [token_text(e.token_id) for e in entries]
    offsets, at = [], text_start
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {token_text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def echoed_prompt_logprobs(prompt_ids: list[int], scored: PromptLogprobs, top: int) -> list[TokenLogprobs]:
    """An echoed prompt's entries for `completion_logprobs`, with `top` most likely tokens each."""
    first = TokenLogprobs(prompt_ids[0], None, [])
    return [first] + [TokenLogprobs(e.token_id, e.logprob, e.top[:top]) for e in scored[1:]]


def vllm_prompt_logprobs(scored: PromptLogprobs, token_text: TokenText, top: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt position, None for the first, else its token's and
    the `top` most likely ones', by token id, each with its logprob, rank and text."""

    def entry(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": token_text(token_id)}

    ranked = []
    for e in scored:
        if e is None:
            ranked.append(None)
            continue
        tokens = {str(e.token_id): entry(e.token_id, e.logprob, e.rank)}
        for rank, (token_id, logprob) in enumerate(e.top[:top], start=1):
            tokens.setdefault(str(token_id), entry(token_id, logprob, rank))
        ranked.append(tokens)
    return ranked


def chat_logprobs(entries: list[TokenLogprobs], token_text: TokenText) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        token = token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def completion_body(request_id: str, model: str, choices: list[dict], usage: Usage | None, chat: bool) -> dict:
    body = {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage.to_dict()
    return body


def chunk_body(request_id: str, model: str, choices: list[dict], usage: Usage | None, chat: bool) -> dict:
    body = completion_body(request_id, model, choices, usage, chat)
    body["object"] = "chat.completion.chunk" if chat else "text_completion"
    if usage is None and chat:
        body["usage"] = None
    return body


def cosine(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def _embedded_tokens(outputs: list[EmbeddingOutput]) -> dict:
    total = sum(o.num_prompt_tokens for o in outputs)
    return {"prompt_tokens": total, "total_tokens": total}


def score_body(model: str, scores: list[float], outputs: list[EmbeddingOutput]) -> dict:
    """vLLM's score response; `outputs`: the embeddings computed for it."""
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "score", "score": score} for i, score in enumerate(scores)],
            "usage": _embedded_tokens(outputs)}


def rerank_body(model: str, documents: list[str], scores: list[float], top_n: int,
                outputs: list[EmbeddingOutput]) -> dict:
    """vLLM's rerank response: the `top_n` best documents (0: all), best first."""
    ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[: top_n or None]
    results = [{"index": i, "document": {"text": documents[i]}, "relevance_score": scores[i]} for i in ranked]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "usage": _embedded_tokens(outputs), "results": results}


def embeddings_body(model: str, outputs: list[EmbeddingOutput], encoding_format: str, dimensions: int | None,
                    normalize: bool) -> dict:
    """OpenAI's embeddings response. With `dimensions` each vector keeps that many leading
    components, normalised again when the server normalises; `base64` is the float32
    little-endian bytes of each vector, as OpenAI encodes them."""
    data = []
    for index, output in enumerate(outputs):
        vector = np.asarray(output.embedding[:dimensions], dtype=np.float32)
        if dimensions is not None and normalize:
            vector /= max(float(np.linalg.norm(vector)), 1e-12)
        as_bytes = vector.astype("<f4").tobytes()
        encoded = base64.b64encode(as_bytes).decode() if encoding_format == "base64" else vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    prompt_tokens = sum(o.num_prompt_tokens for o in outputs)
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
             "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}
    return {"object": "list", "data": data, "model": model, "usage": usage}
