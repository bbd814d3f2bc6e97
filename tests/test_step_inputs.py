"""The persistent `InputBatch` builds, every step, the inputs a plain per-token construction
builds from the engine's own state: under chunked prefill, prefix-cache hits, `n > 1` forks
(with their block copies), preemption and aborts."""

import random

import torch

from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.llm import LLM


def expected_inputs(batch, block_tables, block_size, paged):
    """Tokens, positions and metadata from the sequences one by one."""
    chunks = [(seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n], seq.num_computed_tokens,
               block_tables[seq.seq_id]) for seq, n in zip(batch.seqs, batch.num_new_tokens)]
    tokens = [t for new, _, _ in chunks for t in new]
    positions = [p for new, start, _ in chunks for p in range(start, start + len(new))]
    meta = paged.metadata([table for _, _, table in chunks], [start + len(new) for new, start, _ in chunks],
                          [len(new) for new, _, _ in chunks], block_size)
    return tokens, positions, meta


def check_plan(plan, batch, block_tables, block_size, paged) -> None:
    tokens, positions, meta = expected_inputs(batch, block_tables, block_size, paged)
    assert plan.input_ids.tolist() == tokens
    assert plan.positions.tolist() == positions
    got = plan.meta
    assert (got.num_decodes, got.max_query_len, got.max_context_len) == (
        meta.num_decodes, meta.max_query_len, meta.max_context_len)
    assert got.query_start_loc_cpu == meta.query_start_loc_cpu and got.context_lens_cpu == meta.context_lens_cpu
    assert torch.equal(got.query_start_loc, meta.query_start_loc) and torch.equal(got.context_lens, meta.context_lens)
    assert torch.equal(got.slot_mapping, meta.slot_mapping)
    for i, context in enumerate(meta.context_lens_cpu):
        used = -(-context // block_size)
        assert got.block_tables[i, :used].tolist() == meta.block_tables[i, :used].tolist()
        assert not got.block_tables[i, used:].any(), "past its blocks a row must read as padding"


def test_every_step_matches_the_per_token_construction(tiny_checkpoints, paged):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=40, max_model_len=128,
              block_size=8, max_num_batched_tokens=48, max_num_seqs=8)
    engine = llm.engine
    inputs = engine.runner.inputs
    plan_step = inputs.plan
    checked = []

    def checked_plan(step):
        plan = plan_step(step)
        check_plan(plan, step.batch, step.block_tables, engine.config.block_size, paged)
        checked.append(step.batch.num_preempted)
        return plan

    inputs.plan = checked_plan
    rng = random.Random(0)
    shared = [rng.randrange(3, 500) for _ in range(20)]
    for i in range(14):
        prompt = (shared if i % 2 else []) + [rng.randrange(3, 500) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(n=rng.choice([1, 1, 3]), temperature=1.0, seed=i, max_tokens=rng.randint(20, 70),
                                ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params)
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        if step == 6:
            engine.abort_request("r3")
    assert len(checked) == step and sum(checked) > 0, "the pool should be small enough to preempt"
    engine.add_request("last", [5, 6, 7], SamplingParams(max_tokens=2))
    engine.step()  # the first step after the others ended: their rows are given back
    assert list(inputs.rows) == ["last#0"]
