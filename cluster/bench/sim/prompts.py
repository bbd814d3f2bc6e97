"""Workload prompts as token ids and block hashes, without storing either per request.

A prompt is a chain of segments (a shared context, a question, a previous answer, a trace's
hash id), each an id and a length. A segment's tokens are a fixed function of its id, so
equal ids give equal tokens and the real KVCacheManager's prefix hashing finds the reuse the
workload means; its first token is the id itself (negated), so distinct segments never look
alike by accident. Hashing a 7k-token prompt costs about a millisecond, and most prompts share
long prefixes, so `BlockChains` keeps the block hashes of each segment prefix in a trie: a
prefix is hashed once per run, whichever replica or policy asks."""

import random
from collections import OrderedDict

from kvserve.workers.engine.block_hash import ROOT_HASH, BlockHash, hash_block

Segment = tuple[int, int]  # (segment id, tokens)

_POOL_SPAN = 1 << 20
_MAX_SEGMENT = 1 << 18
_POOL = random.Random(0x5EED).choices(range(1, 32000), k=_POOL_SPAN + _MAX_SEGMENT)


def segment_tokens(segment_id: int, length: int) -> list[int]:
    """The tokens of one segment: -(id + 1), then a slice of a fixed random pool."""
    tokens: list[int] = []
    _append_segment(tokens, segment_id, length)
    return tokens


def prompt_tokens(segments: tuple[Segment, ...]) -> list[int]:
    tokens: list[int] = []
    for segment_id, length in segments:
        _append_segment(tokens, segment_id, length)
    return tokens


def _append_segment(tokens: list[int], segment_id: int, length: int) -> None:
    if length > _MAX_SEGMENT:
        raise ValueError(f"a prompt segment may hold at most {_MAX_SEGMENT} tokens, got {length}")
    if length <= 0:
        return
    start = (segment_id * 0x9E3779B97F4A7C15 >> 11) % _POOL_SPAN
    tokens.append(-(segment_id + 1))
    tokens += _POOL[start : start + length - 1]


class _Node:
    """The block hashes a segment prefix adds to its parent's, and its unhashed tail."""

    __slots__ = ("parent", "hashes", "tail", "last")

    def __init__(self, parent: "_Node | None", hashes: list[BlockHash], tail: list[int], last: BlockHash):
        self.parent, self.hashes, self.tail, self.last = parent, hashes, tail, last


class BlockChains:
    """`chain(segments)` = hash_block_chain(prompt_tokens(segments), block_size), memoized
    by segment prefix (the least recently used prefixes are forgotten past `max_nodes`)."""

    def __init__(self, block_size: int, max_nodes: int = 200_000):
        self.block_size = block_size
        self.max_nodes = max_nodes
        self._nodes: OrderedDict[tuple[Segment, ...], _Node] = OrderedDict()
        self._root = _Node(None, [], [], ROOT_HASH)

    def chain(self, segments: tuple[Segment, ...]) -> list[BlockHash]:
        node = self._node(segments)
        parts = []
        while node is not None:
            parts.append(node.hashes)
            node = node.parent
        hashes: list[BlockHash] = []
        for part in reversed(parts):
            hashes += part
        return hashes

    def added_hashes(self, segments: tuple[Segment, ...], segment: Segment) -> list[BlockHash]:
        """chain(segments + (segment,))[len(chain(segments)):], not to be modified."""
        return self._node(segments + (segment,)).hashes

    def _node(self, segments: tuple[Segment, ...]) -> _Node:
        known = len(segments)
        while known and segments[:known] not in self._nodes:
            known -= 1
        node = self._nodes[segments[:known]] if known else self._root
        if known:
            self._nodes.move_to_end(segments[:known])
        for k in range(known, len(segments)):
            node = self._extend(node, segments[k])
            self._nodes[segments[: k + 1]] = node
        while len(self._nodes) > self.max_nodes:
            self._nodes.popitem(last=False)
        return node

    def _extend(self, parent: _Node, segment: Segment) -> _Node:
        tokens = list(parent.tail)
        _append_segment(tokens, *segment)
        size = self.block_size
        hashes, last = [], parent.last
        full = len(tokens) // size
        for i in range(full):
            last = hash_block(last, tokens[i * size : (i + 1) * size], None)
            hashes.append(last)
        return _Node(parent, hashes, tokens[full * size :], last)
