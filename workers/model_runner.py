"""Runs one scheduled step: builds the flat inputs, owns the KV cache tensors, samples.

With tensor parallelism each rank's process holds a `ModelRunner` over its shard of the model
and of the KV cache, and runs the `StepPlan`s that the engine's process builds.
"""

from dataclasses import dataclass

import torch

from kvserve.kernels import get_ops
from kvserve.kernels.metadata import AttentionMetadata
from kvserve.workers.config import EngineConfig
from kvserve.workers.distributed import SINGLE, TPGroup
from kvserve.workers.model_loader import load_model
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.parallel_layers import kv_heads_of_rank
from kvserve.workers.sampler import Sampler, SamplerOutput, SamplingRow
from kvserve.workers.scheduler import ScheduledBatch
from kvserve.workers.sequence import Sequence


@dataclass
class SampleRequest:
    """Sample `seq`'s next token from the logits of the last new token of `batch_index`."""

    batch_index: int
    seq: Sequence


@dataclass
class StepPlan:
    """Everything a forward pass needs, built once per step. `rows` are the sampling rows of
    `last_rows`; with tensor parallelism only rank 0 gets them (the other ranks compute the
    logits of `last_rows` only to take part in gathering them)."""

    block_copies: list[tuple[int, int]]
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_rows: list[int]
    rows: list[SamplingRow] | None
    eos_token_ids: tuple[int, ...]


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE):
        self.config = config
        self.device = config.torch_device()
        self.model_config = ModelConfig.from_pretrained_dir(config.model)
        self.dtype = config.torch_dtype(self.model_config.torch_dtype)
        torch.manual_seed(config.seed)
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.model, _ = load_model(config.model, self.dtype, self.device, config.load_format, tp)
        self.num_kv_heads = kv_heads_of_rank(self.model_config, tp)[1]
        self.block_size = config.block_size
        self.num_kv_blocks = config.num_kv_blocks or self._blocks_that_fit(config.kv_cache_memory_gib)
        self.kv_caches = self._allocate_kv_caches(self.num_kv_blocks)
        self.sampler = Sampler()

    def _bytes_per_block(self) -> int:
        mc = self.model_config
        elements = 2 * mc.num_layers * self.block_size * self.num_kv_heads * mc.head_dim
        return elements * self.dtype.itemsize

    def _blocks_that_fit(self, memory_gib: float) -> int:
        return int(memory_gib * 2**30) // self._bytes_per_block()

    def _allocate_kv_caches(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mc = self.model_config
        shape = (num_blocks, self.block_size, self.num_kv_heads, mc.head_dim)
        # Zeroed: padded reads of unused slots must never meet NaN garbage.
        return [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(mc.num_layers)
        ]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def execute(
        self,
        batch: ScheduledBatch,
        block_tables: dict[str, list[int]],
        samples: list[SampleRequest],
        eos_token_ids: tuple[int, ...],
    ) -> SamplerOutput | None:
        return self.run(build_plan(batch, block_tables, samples, eos_token_ids, self.block_size, self.device))

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> SamplerOutput | None:
        self.copy_blocks(plan.block_copies)
        hidden = self.model(plan.input_ids, plan.positions, self.kv_caches, plan.meta)
        if not plan.last_rows:
            return None
        logits = self.model.compute_logits(hidden[torch.tensor(plan.last_rows, device=self.device)])
        if plan.rows is None:
            return None
        return self.sampler(logits, plan.rows, plan.eos_token_ids)


def build_plan(
    batch: ScheduledBatch,
    block_tables: dict[str, list[int]],
    samples: list[SampleRequest],
    eos_token_ids: tuple[int, ...],
    block_size: int,
    device: torch.device,
) -> StepPlan:
    input_ids, positions, meta = _prepare_inputs(batch, block_tables, block_size, device)
    return StepPlan(
        batch.block_copies,
        input_ids,
        positions,
        meta,
        [meta.query_start_loc_cpu[s.batch_index + 1] - 1 for s in samples],
        [SamplingRow(s.seq.params, s.seq.token_ids, s.seq.num_prompt_tokens, s.seq.generator) for s in samples],
        eos_token_ids,
    )


def _prepare_inputs(
    batch: ScheduledBatch, block_tables: dict[str, list[int]], size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    context_lens: list[int] = []
    tables: list[list[int]] = []
    num_decodes = 0
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        start = seq.num_computed_tokens
        end = start + num_new
        table = block_tables[seq.seq_id]
        if num_new == 1:
            num_decodes += 1
            tokens.append(seq.token_ids[start])
            positions.append(start)
            slots.append(table[start // size] * size + start % size)
        else:
            tokens.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // size] * size + p % size for p in range(start, end))
        starts.append(starts[-1] + num_new)
        context_lens.append(end)
        tables.append(table)
    max_blocks = max(len(t) for t in tables)
    padded = [t + [0] * (max_blocks - len(t)) for t in tables]
    meta = AttentionMetadata(
        num_decodes=num_decodes,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(batch.num_new_tokens),
        max_context_len=max(context_lens),
        query_start_loc_cpu=starts,
        context_lens_cpu=context_lens,
    )
    return (
        torch.tensor(tokens, dtype=torch.long, device=device),
        torch.tensor(positions, dtype=torch.long, device=device),
        meta,
    )
