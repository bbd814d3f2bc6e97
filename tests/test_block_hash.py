"""The block hash the engine and the router share: its value is a wire contract."""

import hashlib
import json
import struct

from kvserve.workers.engine.block_hash import ROOT_HASH, extend_block_chain, hash_block_chain, hash_check_value

BLOCK = 16


def reference_chain(tokens: list[int], salt: str | None, lora: str | None) -> list[bytes]:
    """SHA-256 of: parent's hash, the tokens' byte length (4 bytes, little-endian), the tokens
    (int64, little-endian), and for the first block its extra keys as compact sorted JSON."""
    extra = [k for k in (("salt", salt), ("lora", lora)) if k[1] is not None]
    chain, parent = [], ROOT_HASH
    for i in range(len(tokens) // BLOCK):
        encoded = struct.pack(f"<{BLOCK}q", *tokens[i * BLOCK : (i + 1) * BLOCK])
        digest = hashlib.sha256(parent + len(encoded).to_bytes(4, "little") + encoded)
        if i == 0 and extra:
            digest.update(json.dumps(extra, separators=(",", ":"), sort_keys=True).encode())
        parent = digest.digest()
        chain.append(parent)
    return chain


def test_a_chain_hashes_each_full_block_through_its_parent():
    tokens = [7, 150_000, 0, 2**40] * 20  # 80 tokens: five full blocks
    for salt, lora in [(None, None), ("tenant", None), (None, "adapter"), ("tenant", "adapter")]:
        assert hash_block_chain(tokens + [1, 2, 3], BLOCK, salt, lora) == reference_chain(tokens, salt, lora)


def test_extending_a_chain_in_steps_gives_the_chain_hashed_at_once():
    tokens = list(range(1000, 1000 + 6 * BLOCK))
    hashes: list[bytes] = []
    for blocks in (0, 1, 1, 3, 6):
        extend_block_chain(hashes, tokens, BLOCK, "tenant", blocks, "adapter")
        assert hashes == hash_block_chain(tokens[: blocks * BLOCK], BLOCK, "tenant", "adapter")


def test_the_check_value_never_changes_by_accident():
    assert hash_check_value(BLOCK) == "0d5721e06ae4a12cbc713a40c3f55fd90d34ad0da95e4e75fa216b5bd890620a"
