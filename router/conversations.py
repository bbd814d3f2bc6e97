"""Which requests continue a conversation, and how many turns conversations have had lately.

A chat's or an agent's next request re-sends the conversation so far, so its prompt holds the
whole of an earlier prompt, and with it that prompt's last full block. The router notes the
last block of each prompt it sends; a prompt holding one of them continues a conversation.
With several ingress routers the turns of a conversation reach them at random, so a router
sees the turn before only one time in `routers`; `later_turns` corrects its counts for that.
"""

from collections import deque

from kvserve.workers.protocol import BlockHash


class ConversationLog:
    def __init__(self, window_s: float):
        self.window_s = window_s
        self._prompt_ends: dict[BlockHash, float] = {}  # last block of each prompt sent -> when, oldest first
        self._sends: deque[tuple[float, bool]] = deque()  # (when, whether it continued a conversation)
        self._continued = 0  # of `_sends`
        self._last_answer: tuple[list[BlockHash], bool] | None = None  # the router asks, then sends

    def continues(self, block_hashes: list[BlockHash]) -> bool:
        """Whether a prompt of these blocks continues a conversation sent here lately."""
        if self._last_answer is not None and self._last_answer[0] is block_hashes:
            return self._last_answer[1]
        answer = not self._prompt_ends.keys().isdisjoint(reversed(block_hashes))  # the last turn's end is near the end
        self._last_answer = (block_hashes, answer)
        return answer

    def sent(self, now: float, block_hashes: list[BlockHash]) -> None:
        self._expire(now)
        continued = self.continues(block_hashes)
        self._last_answer = None
        self._sends.append((now, continued))
        self._continued += continued
        if block_hashes:
            self._prompt_ends.pop(block_hashes[-1], None)
            self._prompt_ends[block_hashes[-1]] = now

    def withdraw(self, block_hashes: list[BlockHash]) -> None:
        """A prompt sent lately was refused: its retry continues only what its history held
        before, and counts as the one send of it."""
        sent_at = self._prompt_ends.pop(block_hashes[-1], None) if block_hashes else None
        self._last_answer = None
        if sent_at is None:
            return
        for position in range(len(self._sends) - 1, -1, -1):
            when, continued = self._sends[position]
            if when == sent_at:
                del self._sends[position]
                self._continued -= continued
                return

    def later_turns(self, routers: int) -> float:
        """Requests after the first per conversation, lately. Of the continuations, this
        router saw one in `routers` as such and took the rest for new conversations."""
        continued = self._continued * routers
        started = len(self._sends) - continued
        return continued / max(started, 1)

    def _expire(self, now: float) -> None:
        since = now - self.window_s
        sends, ends = self._sends, self._prompt_ends
        while sends and sends[0][0] < since:
            self._continued -= sends.popleft()[1]
        while ends:
            oldest = next(iter(ends))
            if ends[oldest] >= since:
                break
            del ends[oldest]
