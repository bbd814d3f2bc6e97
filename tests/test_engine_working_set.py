"""A replica counts the distinct prompt blocks its requests asked for lately and reports them
in its heartbeat (`EngineStats.working_set_blocks`): with several ingress routers, each of
which sees only its share of the replica's traffic, that count is the whole."""

from kvserve.workers.engine.block_hash import hash_block_chain
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.working_set import RecentBlocks
from kvserve.workers.llm import LLM


def test_recent_blocks_count_distinct_blocks_within_the_window_and_at_most_the_limit():
    now = [0.0]
    recent = RecentBlocks(limit=6, window_s=10.0, clock=lambda: now[0])
    system, first, second = (hash_block_chain(list(range(k, k + 8)), 4) for k in (0, 100, 200))
    recent.ask(system + first)
    now[0] = 6.0
    recent.ask(system + second)  # the system prompt is asked again: counted once, as of now
    assert recent.count() == 6
    now[0] = 12.0  # `first` was last asked 12 s ago
    assert recent.count() == 4
    recent.ask(hash_block_chain(list(range(300, 312)), 4))  # three more: the oldest go past the limit
    assert recent.count() == 6
    now[0] = 17.0
    assert recent.count() == 3


def test_the_engine_reports_the_prompt_blocks_its_requests_asked_for(tiny_checkpoints):
    llm = LLM(str(tiny_checkpoints["llama"]), device="cpu", num_kv_blocks=64, max_model_len=128, block_size=8)
    engine = llm.engine
    shared = list(range(3, 27))  # three blocks
    for k, tail in enumerate([[30] * 9, [31] * 9, [32] * 4]):
        engine.add_request(f"r{k}", shared + tail, SamplingParams(max_tokens=2, ignore_eos=True))
    # 3 shared blocks and one whole block more for each of the first two prompts; the third's
    # tail is no whole block.
    assert engine.stats().working_set_blocks == 5
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().working_set_blocks == 5  # finished, still wanted within the window
