"""A step's model inputs: the flat tokens, positions and attention metadata of a batch.

`InputBatch` keeps the block tables of the sequences it has seen in place between steps, so a
step writes only the blocks a sequence gained and the rows of sequences that joined; the rest
(positions, slots, context lengths) comes from a few array operations over the batch rather
than a loop over every token. `flat_inputs` builds the same from explicit chunks, for the
warm-up and the kernel benchmarks.
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from kvserve.kernels.metadata import AttentionMetadata
from kvserve.workers.engine.executor import SampleRequest, StepRequest, TokenMasks
from kvserve.workers.engine.sequence import PENDING_TOKEN
from kvserve.workers.runner.sampler import SamplingRow
from kvserve.workers.runner.transfer import to_device

# One sequence's share of a step: its new tokens, the position of the first, its block table.
Chunk = tuple[list[int], int, list[int]]


@dataclass
class StepPlan:
    """Everything a forward pass needs, built once per step. `rows` are the sampling rows of
    `last_rows`; with tensor parallelism only rank 0 gets them (the other ranks compute the
    logits of `last_rows` only to take part in gathering them)."""

    block_copies: list[tuple[int, int]]
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_rows: np.ndarray  # the flat index of each sampling row's last token
    rows: list[SamplingRow] | None
    eos_token_ids: tuple[int, ...]
    token_masks: TokenMasks | None = None
    pooled: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each pooled chunk's tokens
    # Speculative steps: the position within its proposal of each row (0 for a plain sample).
    draft_positions: list[int] | None = None
    lora_slots: torch.Tensor | None = None  # each token's LoRA slot (-1: the base model), set by the runner


class InputBatch:
    """The block tables of the sequences being served, one row each, kept between steps."""

    def __init__(self, max_blocks_per_seq: int, block_size: int, device: torch.device, capacity: int = 64):
        self.block_size = block_size
        self.device = device
        self.tables = np.zeros((capacity, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks: list[int] = [0] * capacity  # of each row, as copied from its sequence
        self.rows: dict[str, int] = {}
        self.free_rows = list(range(capacity - 1, -1, -1))
        self.sampling_rows: dict[str, SamplingRow] = {}  # of the sequences that sampled

    def plan(self, step: StepRequest, previous_tokens: torch.Tensor | None = None) -> StepPlan:
        """The step's plan. A sequence whose new token is still pending (async scheduling) takes
        it from `previous_tokens`, the last step's sampled tokens on the device, at its
        `sample_row`: the host never waits for it."""
        batch, block_tables, samples = step.batch, step.block_tables, step.samples
        for seq_id in batch.departed:
            self._drop(seq_id)
        rows, starts, tokens, pending = [], [], [], []
        row_of, num_blocks = self.rows, self.num_blocks
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            table = block_tables[seq.seq_id]
            row = row_of.get(seq.seq_id)
            rows.append(row if row is not None and num_blocks[row] == len(table) else self._row(seq.seq_id, table))
            start = seq.num_computed_tokens
            starts.append(start)
            if num_new == 1:
                if seq.token_ids[start] == PENDING_TOKEN:
                    pending.append((len(tokens), seq.sample_row))
                tokens.append(seq.token_ids[start])
            else:
                chunk = seq.token_ids[start : start + num_new]
                tokens += chunk if len(chunk) == num_new else chunk + seq.draft_token_ids
        input_ids, positions, meta = self._inputs(rows, starts, batch.num_new_tokens, tokens)
        if pending:
            self._fill_pending(input_ids, pending, previous_tokens)
        last_rows = (np.asarray(meta.query_start_loc_cpu[1:]) - 1)[[s.batch_index for s in samples]]
        cached = self.sampling_rows
        sampling_rows = [cached.get(s.seq.seq_id) or self._sampling_row(s.seq) for s in samples]
        starts = meta.query_start_loc_cpu
        pooled = [(starts[i], starts[i + 1]) for i in step.pooled]
        plan = StepPlan(batch.block_copies, input_ids, positions, meta, last_rows, sampling_rows,
                        step.eos_token_ids, step.token_masks, pooled)
        return _with_draft_rows(plan, samples) if step.speculative else plan

    def _sampling_row(self, seq) -> SamplingRow:
        row = self.sampling_rows[seq.seq_id] = SamplingRow(seq.params, seq.token_ids, seq.num_prompt_tokens, seq.seed)
        return row

    def _fill_pending(self, input_ids: torch.Tensor, pending: list[tuple[int, int]],
                      previous_tokens: torch.Tensor | None) -> None:
        """input_ids[at] = previous_tokens[sample_row] for each (at, sample_row), on the device."""
        if previous_tokens is None:
            raise RuntimeError("a pending token in a step planned without the step that computes it")
        at, sample_rows = zip(*pending)
        input_ids[to_device(at, torch.long, self.device)] = previous_tokens[
            to_device(sample_rows, torch.long, self.device)]

    def _row(self, seq_id: str, table: list[int]) -> int:
        """`seq_id`'s row, with the blocks its table gained since the last step copied in.
        Tables only grow while a sequence runs; a preempted one departs and comes back anew."""
        row = self.rows.get(seq_id)
        if row is None:
            row = self._add(seq_id)
        copied = self.num_blocks[row]
        if len(table) != copied:
            self.tables[row, copied : len(table)] = table[copied:]
            self.num_blocks[row] = len(table)
        return row

    def _add(self, seq_id: str) -> int:
        if not self.free_rows:
            self._grow()
        row = self.free_rows.pop()
        self.rows[seq_id] = row
        self.tables[row] = 0  # past a sequence's blocks its row reads as padding, never as old ids
        self.num_blocks[row] = 0
        return row

    def _grow(self) -> None:
        capacity = len(self.num_blocks)
        self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
        self.num_blocks += [0] * capacity
        self.free_rows = list(range(2 * capacity - 1, capacity - 1, -1))

    def _drop(self, seq_id: str) -> None:
        self.sampling_rows.pop(seq_id, None)
        row = self.rows.pop(seq_id, None)
        if row is not None:
            self.free_rows.append(row)

    def _inputs(
        self, rows: list[int], starts: list[int], query_lens: list[int], tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        size, device = self.block_size, self.device
        row_of_seq = np.array(rows, dtype=np.int64)
        start = np.array(starts, dtype=np.int64)
        query = np.array(query_lens, dtype=np.int64)
        ends = np.cumsum(query)
        if len(tokens) == len(rows):  # decodes only: one token per sequence
            positions, row_of_token = start, row_of_seq
        else:
            row_of_token = np.repeat(row_of_seq, query)
            positions = np.repeat(start - (ends - query), query) + np.arange(len(tokens))
        slots = self.tables[row_of_token, positions // size].astype(np.int64) * size + positions % size
        context = start + query
        max_context = int(context.max())
        query_start = np.concatenate([[0], ends])
        # One copy to the device for all the 1-D inputs, then views of it.
        num_tokens, num_seqs = len(tokens), len(rows)
        flat = to_device(np.concatenate([tokens, positions, slots, query_start, context]), torch.long, device)
        input_ids, positions_t, slot_mapping = flat[: 3 * num_tokens].view(3, num_tokens)
        meta = AttentionMetadata(
            num_decodes=query_lens.count(1),
            query_start_loc=flat[3 * num_tokens : 3 * num_tokens + num_seqs + 1].to(torch.int32),
            context_lens=flat[3 * num_tokens + num_seqs + 1 :].to(torch.int32),
            block_tables=to_device(self.tables[row_of_seq, : -(-max_context // size)], torch.int32, device),
            slot_mapping=slot_mapping,
            max_query_len=max(query_lens),
            max_context_len=max_context,
            query_start_loc_cpu=query_start.tolist(),
            context_lens_cpu=context.tolist(),
        )
        return input_ids, positions_t, meta


def _with_draft_rows(plan: StepPlan, samples: list[SampleRequest]) -> StepPlan:
    """`plan` with a row for every position a proposal is verified at: a sample whose sequence
    has k proposed tokens gets the rows of its last k + 1 tokens, each sampled as the output
    token it would be. Token masks move to the rows of their samples."""
    widths = [1 + len(s.seq.draft_token_ids) for s in samples]
    sample_of_row = np.repeat(np.arange(len(samples)), widths)
    position = np.arange(len(sample_of_row)) - np.repeat(np.cumsum(widths) - widths, widths)
    last_rows = plan.last_rows[sample_of_row] - (np.repeat(widths, widths) - 1 - position)
    rows = [plan.rows[i] for i in sample_of_row.tolist()]
    masks = plan.token_masks
    if masks is not None:
        first_row = (np.cumsum(widths) - widths).tolist()
        masks = TokenMasks(masks.bitmask[torch.from_numpy(sample_of_row)], [first_row[i] for i in masks.rows])
    return dataclasses.replace(plan, last_rows=last_rows, rows=rows, token_masks=masks,
                               draft_positions=position.tolist())


def flat_inputs(
    chunks: list[Chunk], size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """The flattened tokens, positions and attention metadata of explicit chunks; the chunks of
    one new token (decodes) come first."""
    batch = InputBatch(max(len(table) for _, _, table in chunks), size, device, capacity=len(chunks))
    rows = [batch._row(str(i), table) for i, (_, _, table) in enumerate(chunks)]
    tokens = [token for new_tokens, _, _ in chunks for token in new_tokens]
    return batch._inputs(rows, [start for _, start, _ in chunks], [len(t) for t, _, _ in chunks], tokens)
