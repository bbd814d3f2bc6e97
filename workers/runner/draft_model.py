"""The draft model of speculative decoding (`method: draft`): a smaller checkpoint with the
target's tokenizer, run autoregressively in the engine's process for each step's proposals.

Its KV cache has the target pool's shape in blocks and is addressed by the target's block
tables: a token's draft K/V sit in the same block and slot as its target K/V, so the KV cache
manager's allocation, rollback and preemption cover both, and the draft has no allocator.

What the draft cache holds is tracked per sequence (`num_draft_computed`), never per block: a
sequence runs every token it has not run through the draft itself, prefix-cache hits and forked
prompts included, and a preempted one starts again from 0. No block's draft K/V is trusted
because the target cached it (a request that never speculated left none). A block shared
through the prefix cache is then written again with the K/V of the same tokens at the same
positions, the values its other readers already use. The price is a draft prefill per prompt.

On the target's device (tp_size 1) the target's KV pool is sized to leave room for the draft's
weights and KV cache (`draft_memory` in kv_memory.py). With worker actors (tensor parallelism)
the draft runs whole, unsharded, here in the ranks' driver process, on this process's device; rank 0 gets the
draft's distributions with the step. No rank's pool counts it, so there it must not be on a GPU
(`check_draft_device`): a serving replica with worker actors reserves no GPU, Ray shows it none,
and with `device: auto` the draft runs on the replica's CPU.
"""

import torch
from transformers import AutoTokenizer

from kvserve.kernels.metadata import AttentionMetadata
from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.sequence import Sequence
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.distributed import SINGLE
from kvserve.workers.models.gguf_checkpoint import tokenizer_args
from kvserve.workers.models.loader import load_model
from kvserve.workers.models.parallel_layers import kv_heads_of_rank
from kvserve.workers.runner.rejection_sampling import Use, filtered_probs, uniforms
from kvserve.workers.runner.sampler import draw_weights
from kvserve.workers.runner.step_inputs import Chunk, flat_inputs


class DraftModelRunner:
    def __init__(self, config: EngineConfig, target: ModelConfig, num_kv_blocks: int):
        draft_dir = config.speculative.model
        self.model_config = mc = ModelConfig.from_pretrained_dir(draft_dir)
        check_draft_model(config, target, mc)
        self.device = config.torch_device()
        dtype = config.torch_dtype(mc.torch_dtype)
        torch.manual_seed(config.seed)  # dummy weights as the target's: its own folder drafts as itself
        self.model, _ = load_model(draft_dir, dtype, self.device, config.load_format)
        self.block_size = config.block_size
        self.max_pass_tokens = config.max_num_batched_tokens
        shape = (num_kv_blocks, self.block_size, kv_heads_of_rank(mc, SINGLE)[1], mc.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(mc.num_layers)]

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], block_tables: dict[str, list[int]]) -> None:
        """Each sequence's proposal, as many tokens as its `draft_token_ids` placeholders: the
        first pass runs the tokens it has not run yet (at least its last), each later pass the
        token drawn before."""
        tables = [block_tables[seq.seq_id] for seq in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        dists: list[list[torch.Tensor | None]] = [[] for _ in seqs]
        chunks = self._catch_up([(seq.token_ids[seq.num_draft_computed :], seq.num_draft_computed, table)
                                 for seq, table in zip(seqs, tables)])
        for seq in seqs:
            seq.num_draft_computed = seq.num_tokens
        active = list(range(len(seqs)))
        while active:
            tokens, probs = self._draw(self._last_logits(chunks), [seqs[i] for i in active],
                                       [len(drafts[i]) for i in active])
            for i, token, q in zip(active, tokens, probs):
                drafts[i].append(token)
                dists[i].append(q)
            active = [i for i in active if len(drafts[i]) < len(seqs[i].draft_token_ids)]
            chunks = [([drafts[i][-1]], seqs[i].num_tokens + len(drafts[i]) - 1, tables[i]) for i in active]
        for seq, tokens, probs in zip(seqs, drafts, dists):
            seq.draft_token_ids = tokens
            seq.draft_probs = None if probs[0] is None else torch.stack(probs)

    def _catch_up(self, chunks: list[Chunk]) -> list[Chunk]:
        """Run the draft over the chunks' tokens, storing their K/V, in passes of at most
        `max_num_batched_tokens` (a prefix-cache hit may leave a whole long prompt unrun), until
        what is left fits one pass; each chunk keeps at least its last token for that pass, which
        takes the logits."""
        while sum(len(tokens) for tokens, _, _ in chunks) > self.max_pass_tokens:
            piece, rest, room = [], [], self.max_pass_tokens
            for tokens, start, table in chunks:
                take = max(0, min(room, len(tokens) - 1))
                if take:
                    piece.append((tokens[:take], start, table))
                    room -= take
                rest.append((tokens[take:], start + take, table))
            if not piece:  # one token left in each: more chunks than a pass's tokens
                break
            self._forward(piece)
            chunks = rest
        return chunks

    def _forward(self, chunks: list[Chunk]) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """The draft's hidden states for the chunks' tokens, their K/V stored; the pass's metadata
        and the order (decodes first) in which the chunks ran."""
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i][0]) != 1)  # decodes first
        input_ids, positions, meta = flat_inputs([chunks[i] for i in order], self.block_size, self.device)
        return self.model(input_ids, positions, self.kv_caches, meta), meta, order

    def _last_logits(self, chunks: list[Chunk]) -> torch.Tensor:
        """The draft's logits after the last token of each chunk, its K/V stored on the way."""
        hidden, meta, order = self._forward(chunks)
        last = torch.tensor(meta.query_start_loc_cpu[1:], device=self.device) - 1
        logits = torch.empty((len(chunks), self.model_config.vocab_size), dtype=torch.float32, device=self.device)
        logits[torch.tensor(order, device=self.device)] = self.model.compute_logits(hidden[last]).float()
        return logits

    @staticmethod
    def _draw(logits: torch.Tensor, seqs: list[Sequence], positions: list[int]) -> tuple[list[int], list]:
        """Each row's proposed token: the argmax for a greedy request (a point mass, so no
        distribution), else a draw from the draft's filtered distribution q, returned with it."""
        tokens = logits.argmax(dim=-1).tolist()
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        drawing = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if drawing:
            q = filtered_probs(logits[drawing], [seqs[i].params for i in drawing])
            numbers = uniforms([seqs[i].seed for i in drawing],
                               [seqs[i].num_output_tokens + positions[i] for i in drawing], Use.DRAFT, q.device)
            for i, token, row in zip(drawing, draw_weights(q, numbers).tolist(), q):
                tokens[i], probs[i] = token, row
        return tokens, probs


def check_draft_device(config: EngineConfig) -> None:
    """Raise ValueError when the draft would be on a GPU whose memory no KV pool sizing counts:
    with worker actors it runs in the engine's process, on a GPU that a rank may fill."""
    if config.uses_workers and config.torch_device().type == "cuda":
        raise ValueError(
            "speculative.model: with the model on worker actors (tp_size > 1, or distributed_executor_backend "
            "'ray') the draft model runs in the engine's process, and this process would put it on a GPU that "
            "the ranks' KV pools leave no room for: use tp_size 1, where the pool is sized for both models"
        )


def check_draft_model(config: EngineConfig, target: ModelConfig, draft: ModelConfig) -> None:
    """Raise ValueError, naming the setting, unless the draft shares the target's vocabulary and
    tokenizer and reaches as far as the target's sequences."""
    draft_dir = config.speculative.model
    problem = None
    if draft.vocab_size != target.vocab_size:
        problem = (f"has a vocabulary of {draft.vocab_size} tokens where the target's has {target.vocab_size}: "
                   "it must share the target's tokenizer")
    elif _vocabulary(draft_dir) != _vocabulary(config.tokenizer_dir):
        problem = "has a tokenizer other than the target's: it must share the target's tokenizer"
    elif draft.max_position_embeddings < config.effective_max_model_len(target):
        problem = (f"reaches {draft.max_position_embeddings} positions, fewer than the target's max_model_len "
                   f"{config.effective_max_model_len(target)}")
    if problem:
        raise ValueError(f"speculative.model: the draft model {draft_dir} {problem}")


def _vocabulary(model_dir: str) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(**tokenizer_args(model_dir), local_files_only=True).get_vocab()
