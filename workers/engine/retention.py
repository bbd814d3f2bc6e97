"""Retention priorities: how much a request wants each of its KV blocks kept once it is done.

A request names token ranges with a priority from 0 (evicted first) to 100 (evicted last),
each for a duration or for good, and a priority for the blocks holding generated tokens. A
block takes the highest priority asked for any of its tokens: a prompt token outside every
range asks for the default, a generated token for the decode priority.
"""

import math
from dataclasses import dataclass, field

DEFAULT_RETENTION_PRIORITY = 35
MAX_RETENTION_PRIORITY = 100


def check_retention_priority(priority: int, name: str) -> None:
    if not 0 <= priority <= MAX_RETENTION_PRIORITY:
        raise ValueError(f"{name} must be between 0 and {MAX_RETENTION_PRIORITY}, got {priority}")


@dataclass(frozen=True)
class RetentionAsk:
    """A priority asked for a block, until `expires_at` (monotonic time; None: for good)."""

    priority: int
    expires_at: float | None


DEFAULT_ASK = RetentionAsk(DEFAULT_RETENTION_PRIORITY, None)


@dataclass(frozen=True)
class RetentionRange:
    """Tokens [start, end) of the prompt (`end` None: to the prompt's end)."""

    start: int
    end: int | None
    priority: int
    duration_s: float | None = None

    def __post_init__(self):
        check_retention_priority(self.priority, "kv_retention range priority")
        if self.start < 0 or (self.end is not None and self.end <= self.start):
            raise ValueError(f"kv_retention range [{self.start}, {self.end}) is empty or negative")
        if self.duration_s is not None and not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"kv_retention range duration_s must be a positive number, got {self.duration_s}")

    def ask(self, now: float) -> RetentionAsk:
        return RetentionAsk(self.priority, None if self.duration_s is None else now + self.duration_s)


@dataclass(frozen=True)
class KVRetention:
    ranges: tuple[RetentionRange, ...] = field(default=())
    decode_priority: int = DEFAULT_RETENTION_PRIORITY

    def __post_init__(self):
        check_retention_priority(self.decode_priority, "kv_retention decode_priority")

    @property
    def is_default(self) -> bool:
        return not self.ranges and self.decode_priority == DEFAULT_RETENTION_PRIORITY

    def with_range(self, extra: RetentionRange) -> "KVRetention":
        return KVRetention((*self.ranges, extra), self.decode_priority)

    def block_asks(self, first: int, count: int, block_size: int, num_prompt_tokens: int,
                   now: float) -> list[RetentionAsk]:
        """The asks for blocks first..first+count-1 of a sequence whose prompt has `num_prompt_tokens`."""
        return [self._block_ask(b * block_size, (b + 1) * block_size, num_prompt_tokens, now)
                for b in range(first, first + count)]

    def _block_ask(self, start: int, end: int, num_prompt_tokens: int, now: float) -> RetentionAsk:
        asks = []
        prompt_end = min(end, num_prompt_tokens)
        covered: list[tuple[int, int]] = []
        for r in self.ranges:
            lo, hi = max(start, r.start), min(prompt_end, num_prompt_tokens if r.end is None else r.end)
            if lo < hi:
                asks.append(r.ask(now))
                covered.append((lo, hi))
        if start < prompt_end and not _covers(covered, start, prompt_end):
            asks.append(DEFAULT_ASK)
        if end > num_prompt_tokens:
            asks.append(RetentionAsk(self.decode_priority, None))
        return max(asks, key=_strength)


def _covers(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    reached = start
    for lo, hi in sorted(spans):
        if lo > reached:
            return False
        reached = max(reached, hi)
    return reached >= end


def _strength(ask: RetentionAsk) -> tuple[int, float]:
    return (ask.priority, math.inf if ask.expires_at is None else ask.expires_at)


def stronger(ask: RetentionAsk, held: RetentionAsk | None, now: float) -> bool:
    """Whether `ask` should replace `held`, the ask a block holds: a block keeps the highest
    priority asked for it while that lasts (and of equal ones, the one lasting longest)."""
    if held is None:
        return True
    if held.expires_at is not None and held.expires_at <= now:
        held = DEFAULT_ASK
    return _strength(ask) > _strength(held)


def effective_priority(held: RetentionAsk | None, now: float) -> int:
    if held is None or (held.expires_at is not None and held.expires_at <= now):
        return DEFAULT_RETENTION_PRIORITY
    return held.priority


def with_prefix_retention(retention: KVRetention | None, token_ids: list[int], prefixes) -> KVRetention | None:
    """`retention` plus a range for each deployment prefix rule (`PrefixRetention`) that
    `token_ids` start with; None when nothing asks for more than the default."""
    for rule in prefixes:
        prefix = rule.prefix_token_ids
        if len(prefix) <= len(token_ids) and token_ids[: len(prefix)] == prefix:
            retention = (retention or KVRetention()).with_range(
                RetentionRange(0, len(prefix), rule.priority, rule.duration_s))
    return None if retention is None or retention.is_default else retention
