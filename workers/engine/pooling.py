"""Embeddings: a prompt's final hidden states pooled into one vector as its chunks are computed.

`last` takes the hidden state of the prompt's last token; it reads the prefix cache like any
prompt (only the last token must be computed). `mean` averages every token's, so it computes
the whole prompt and reads no cached block (it still leaves its blocks in the cache for others).
"""

from typing import Literal

import torch

PoolingMode = Literal["last", "mean"]


class PooledPrompt:
    """One embedding request's pooled state: the runner hands each of its chunks' pooled rows
    (the last token's hidden state, or the sum of the chunk's) to `add`."""

    def __init__(self, mode: PoolingMode):
        self.mode = mode
        self._pooled: torch.Tensor | None = None

    @property
    def reads_cached_prefix(self) -> bool:
        return self.mode == "last"

    def add(self, chunk: torch.Tensor) -> None:
        if self.mode == "last" or self._pooled is None:
            self._pooled = chunk.clone()
        else:
            self._pooled += chunk

    def vector(self, num_tokens: int, normalize: bool) -> list[float]:
        """The embedding of a prompt of `num_tokens` tokens, all added, L2-normalised or not."""
        vector = self._pooled / num_tokens if self.mode == "mean" else self._pooled
        if normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        return vector.tolist()


def pool_chunks(hidden: torch.Tensor, starts: list[int], ends: list[int], mode: PoolingMode) -> torch.Tensor:
    """[len(starts), hidden] float32: for each chunk hidden[start:end] of the flat batch, its last
    row (`last`) or the sum of its rows (`mean`)."""
    if mode == "last":
        return hidden[torch.tensor(ends, device=hidden.device) - 1].float()
    return torch.stack([hidden[start:end].float().sum(dim=0) for start, end in zip(starts, ends)])
