"""A step's model inputs: the flat tokens, positions and attention metadata of a batch.

`InputBatch` keeps the block tables of the sequences it has seen in place between steps, so a
step writes only the blocks a sequence gained and the rows of sequences that joined; the rest
(positions, slots, context lengths) comes from a few array operations over the batch rather
than a loop over every token. `flat_inputs` builds the same from explicit chunks, for the
warm-up and the kernel benchmarks.
"""

import dataclasses
import itertools
import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from kvserve.kernels.metadata import AttentionMetadata
from kvserve.workers.engine.executor import SampleRequest, StepRequest, TokenMasks
from kvserve.workers.engine.sequence import PENDING_TOKEN
from kvserve.workers.runner.prompt_logprobs import PromptScoring, prompt_scoring
from kvserve.workers.runner.sampler import SamplingRow
from kvserve.workers.runner.transfer import to_device

_NUM_COMPUTED = operator.attrgetter("num_computed_tokens")
_TOKEN_IDS = operator.attrgetter("token_ids")
_BATCH_INDEX = operator.attrgetter("batch_index")
_SAMPLE_SEQ_ID = operator.attrgetter("seq.seq_id")

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
    prompt_scoring: PromptScoring | None = None  # the positions whose logits score a prompt token


@dataclass
class _Repeat:
    """What a step's plan keeps for the next one when its samples come back as the very same
    list (the engine's sign that the same sequences decode again, one sample each, in order)."""

    samples: list[SampleRequest]
    rows: np.ndarray  # of each sequence in `InputBatch.tables`
    last_rows: np.ndarray | None  # worked out once the step's query starts are known
    sampling_rows: list[SamplingRow]


class InputBatch:
    """The block tables of the sequences being served, one row each, kept between steps."""

    def __init__(self, max_blocks_per_seq: int, block_size: int, device: torch.device, capacity: int = 64):
        self.block_size = block_size
        self.device = device
        self.tables = np.zeros((capacity, max_blocks_per_seq), dtype=np.int32)
        self.num_blocks = np.zeros(capacity, dtype=np.int64)  # of each row, as copied from its sequence
        self.rows: dict[str, int] = {}
        self.free_rows = list(range(capacity - 1, -1, -1))
        self.sampling_rows: dict[str, SamplingRow] = {}  # of the sequences that sampled
        self._last: _Repeat | None = None

    def plan(self, step: StepRequest, previous_tokens: torch.Tensor | None = None) -> StepPlan:
        """The step's plan. A sequence whose new token is still pending (async scheduling) takes
        it from `previous_tokens`, the last step's sampled tokens on the device, at its
        `sample_row`: the host never waits for it."""
        batch, samples = step.batch, step.samples
        self._follow_tables(batch, step.block_tables)
        seqs, query_lens = batch.seqs, batch.num_new_tokens
        repeat = self._last
        if repeat is None or repeat.samples is not samples or batch.departed or step.speculative:
            repeat = self._last = _Repeat(samples, self._rows([seq.seq_id for seq in seqs], step.block_tables),
                                          None, self._sampling_rows(samples))
        starts = np.fromiter(map(_NUM_COMPUTED, seqs), np.int64, len(seqs))
        if query_lens.count(1) == len(query_lens):
            tokens = list(map(operator.getitem, map(_TOKEN_IDS, seqs), starts.tolist()))
        else:
            tokens = _chunk_tokens(seqs, starts.tolist(), query_lens)
        input_ids, positions, meta = self._inputs(repeat.rows, starts, query_lens, tokens)
        if PENDING_TOKEN in tokens:
            self._fill_pending(input_ids, tokens, seqs, meta.query_start_loc_cpu, previous_tokens)
        if repeat.last_rows is None:
            batch_indices = np.fromiter(map(_BATCH_INDEX, samples), np.int64, len(samples))
            repeat.last_rows = np.asarray(meta.query_start_loc_cpu[1:], dtype=np.int64)[batch_indices] - 1
        starts = meta.query_start_loc_cpu
        pooled = [(starts[i], starts[i + 1]) for i in step.pooled]
        plan = StepPlan(batch.block_copies, input_ids, positions, meta, repeat.last_rows, repeat.sampling_rows,
                        step.eos_token_ids, step.token_masks, pooled,
                        prompt_scoring=prompt_scoring(seqs, step.prompt_scored, starts, query_lens, self.device))
        return _with_draft_rows(plan, samples) if step.speculative else plan

    def _follow_tables(self, batch, block_tables: dict[str, list[int]]) -> None:
        """Drop the rows of departed sequences; copy in the blocks the others gained."""
        for seq_id in batch.departed:
            self._drop(seq_id)
        for seq_id in batch.grown:
            if seq_id in self.rows:
                self._row(seq_id, block_tables[seq_id])

    def _rows(self, seq_ids: list[str], block_tables: dict[str, list[int]]) -> np.ndarray:
        """The row of each sequence; one seen for the first time gets a row, its table copied in."""
        rows = np.fromiter(map(self.rows.get, seq_ids, itertools.repeat(-1)), np.int64, len(seq_ids))
        for i in np.flatnonzero(rows < 0).tolist():
            rows[i] = self._row(seq_ids[i], block_tables[seq_ids[i]])
        return rows

    def _sampling_rows(self, samples: list[SampleRequest]) -> list[SamplingRow]:
        """Each sample's `SamplingRow`, made when its sequence first samples and kept."""
        rows = list(map(self.sampling_rows.get, map(_SAMPLE_SEQ_ID, samples)))
        if not all(rows):  # a row is never false: only None is
            for i in [i for i, row in enumerate(rows) if row is None]:
                seq = samples[i].seq
                rows[i] = self.sampling_rows[seq.seq_id] = SamplingRow(seq.params, seq.token_ids,
                                                                       seq.num_prompt_tokens, seq.seed,
                                                                       seq.bad_word_ids)
        return rows

    def _fill_pending(self, input_ids: torch.Tensor, tokens: list[int], seqs: list, query_starts: list[int],
                      previous_tokens: torch.Tensor | None) -> None:
        """input_ids[at] = previous_tokens[seq.sample_row] for each pending token, on the device. A
        pending token is always a sequence's one new token, at its query's start."""
        if previous_tokens is None:
            raise RuntimeError("a pending token in a step planned without the step that computes it")
        at, sample_rows = zip(*[(i, seq.sample_row) for i, seq in zip(query_starts, seqs)
                                if tokens[i] == PENDING_TOKEN])
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
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self.free_rows = list(range(2 * capacity - 1, capacity - 1, -1))

    def _drop(self, seq_id: str) -> None:
        self.sampling_rows.pop(seq_id, None)
        row = self.rows.pop(seq_id, None)
        if row is not None:
            self.free_rows.append(row)

    def _inputs(
        self, row_of_seq: np.ndarray, start: np.ndarray, query_lens: list[int], tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """`row_of_seq` and `start` (each sequence's first new position) as int64 arrays."""
        size, device = self.block_size, self.device
        query = np.array(query_lens, dtype=np.int64)
        ends = np.cumsum(query)
        if len(tokens) == len(row_of_seq):  # decodes only: one token per sequence
            positions, row_of_token = start, row_of_seq
        else:
            row_of_token = np.repeat(row_of_seq, query)
            positions = np.repeat(start - (ends - query), query) + np.arange(len(tokens))
        slots = self.tables[row_of_token, positions // size].astype(np.int64) * size + positions % size
        context = start + query
        max_context = int(context.max())
        query_start = np.concatenate([[0], ends])
        # One copy to the device for all the 1-D inputs, then views of it.
        num_tokens, num_seqs = len(tokens), len(row_of_seq)
        flat = to_device(np.concatenate([tokens, positions, slots, query_start, context]), torch.long, device)
        input_ids, positions_t, slot_mapping = flat[:num_tokens], flat[num_tokens : 2 * num_tokens], flat[
            2 * num_tokens : 3 * num_tokens]
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


def _chunk_tokens(seqs: list, starts: list[int], query_lens: list[int]) -> list[int]:
    """The new tokens of each sequence, one after the other; a sequence verifying proposed
    tokens has them after its own."""
    tokens = []
    for seq, start, num_new in zip(seqs, starts, query_lens):
        chunk = seq.token_ids[start : start + num_new]
        tokens += chunk if len(chunk) == num_new else chunk + seq.draft_token_ids
    return tokens


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
    rows = np.array([batch._row(str(i), table) for i, (_, _, table) in enumerate(chunks)], dtype=np.int64)
    tokens = [token for new_tokens, _, _ in chunks for token in new_tokens]
    starts = np.array([start for _, start, _ in chunks], dtype=np.int64)
    return batch._inputs(rows, starts, [len(t) for t, _, _ in chunks], tokens)
