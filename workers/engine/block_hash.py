"""The block hash shared by the engine and the router.

A full block of the KV cache is named by `hash_block(parent_hash, token_ids, extra_keys)`:
SHA-256 over a canonical byte encoding, so the value is the same in every process and on
every machine, and the chain through `parent_hash` makes a block's name depend on the whole
prefix before it. The router imports this module to compute a prompt's chain; it also
compares `hash_check_value(block_size)` with a replica's before trusting that replica's events.
"""

import hashlib
import json
import struct
from collections.abc import Sequence

BlockHash = bytes

ROOT_HASH: BlockHash = bytes(32)


def _encode_tokens(token_ids: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}q", *token_ids)


def _encode_extra_keys(extra_keys: tuple | None) -> bytes:
    if not extra_keys:
        return b""
    return json.dumps(list(extra_keys), separators=(",", ":"), sort_keys=True).encode()


def hash_block(
    parent_hash: BlockHash, token_ids: Sequence[int], extra_keys: tuple | None = None
) -> BlockHash:
    """The name of a full block, chained through its parent's name."""
    return _block_digest(parent_hash, _encode_tokens(token_ids), _encode_extra_keys(extra_keys))


def _block_digest(parent_hash: BlockHash, encoded_tokens: bytes, encoded_extra: bytes) -> BlockHash:
    length = len(encoded_tokens).to_bytes(4, "little")
    return hashlib.sha256(parent_hash + length + encoded_tokens + encoded_extra).digest()


def first_block_extra_keys(cache_salt: str | None, lora_name: str | None = None) -> tuple | None:
    """Extra keys of a request's first block: tenant salt and adapter name, when present."""
    keys = tuple(k for k in (("salt", cache_salt), ("lora", lora_name)) if k[1] is not None)
    return keys or None


def extend_block_chain(
    hashes: list[BlockHash],
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None,
    num_blocks: int,
    lora_name: str | None = None,
) -> None:
    """Append to `hashes` (the chain of `token_ids`' first blocks so far) the hashes of its
    next blocks, up to `num_blocks` full blocks in all. The KV of one prompt differs per LoRA
    adapter, so the adapter's name is part of the first block's name."""
    first = len(hashes)
    if first >= num_blocks:
        return
    # One encoding of all the new blocks' tokens, sliced per block: a block's own `hash_block`
    # would pack its tokens again (a 32k-token prompt hashes in about half the time).
    encoded = _encode_tokens(token_ids[first * block_size : num_blocks * block_size])
    width = len(encoded) // (num_blocks - first)
    parent = hashes[-1] if first else ROOT_HASH
    for i in range(first, num_blocks):
        extra = _encode_extra_keys(first_block_extra_keys(cache_salt, lora_name)) if i == 0 else b""
        offset = (i - first) * width
        parent = _block_digest(parent, encoded[offset : offset + width], extra)
        hashes.append(parent)


def hash_block_chain(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None,
                     lora_name: str | None = None) -> list[BlockHash]:
    """Hashes of every full block of `token_ids` (under LoRA adapter `lora_name`, if any)."""
    hashes: list[BlockHash] = []
    extend_block_chain(hashes, token_ids, block_size, cache_salt, len(token_ids) // block_size, lora_name)
    return hashes


def hash_check_value(block_size: int) -> str:
    """Hex hash of a fixed test vector: two replicas agree on hashing iff this agrees."""
    vector = list(range(1, 2 * block_size + 1))
    return hash_block_chain(vector, block_size, cache_salt="kvserve-check")[-1].hex()
