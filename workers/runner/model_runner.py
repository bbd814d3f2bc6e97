"""Runs one scheduled step: builds the flat inputs, owns the KV cache tensors, samples.

With tensor parallelism each rank's process holds a `ModelRunner` over its shard of the model
and of the KV cache, and runs the `StepPlan`s that the engine's process builds.
"""

import logging
from dataclasses import dataclass

import torch

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.executor import SamplerOutput, StepRequest
from kvserve.workers.engine.pooling import pool_chunks
from kvserve.workers.runner.cuda_graphs import DecodeGraphs
from kvserve.workers.models.distributed import SINGLE, TPGroup
from kvserve.workers.runner.kv_memory import (
    GPUMemoryProfile, blocks_for_gpu, configured_pool_blocks, draft_memory, rank_block_bytes,
)
from kvserve.workers.models.loader import load_model
from kvserve.workers.models.config import ModelConfig
from kvserve.workers.models.parallel_layers import kv_heads_of_rank
from kvserve.workers.runner.sampler import SampledTokens, Sampler, SamplingRow
from kvserve.workers.runner.host_kv_tier import HostKVTier, host_blocks_for
from kvserve.workers.runner.lora_slots import LoRASlots, token_slots
from kvserve.workers.runner.lora_weights import LoRAWeights
from kvserve.workers.runner.prompt_logprobs import score_prompts
from kvserve.workers.runner.rejection_sampling import DrawnProposal, drawn_proposals, proposal_logits, verify_drawn
from kvserve.workers.runner.step_inputs import Chunk, InputBatch, StepPlan, flat_inputs
from kvserve.workers.engine.sampling_params import SamplingParams
from kvserve.workers.engine.step_clock import StepClock
from kvserve.workers.runner.transfer import to_device

logger = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's own log file
GIB = 2**30


@dataclass
class LaunchedStep:
    """A step queued on the device (async scheduling); None for a step that samples nothing."""

    sampled: SampledTokens | None

    def result(self) -> SamplerOutput:
        """Waits for the step: the host reads its tokens."""
        if self.sampled is None:
            return SamplerOutput([], [], [])
        return self.sampled.output()


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE):
        config.check_device()
        self.config = config
        self.device = config.torch_device()
        self.model_config = mc = ModelConfig.from_pretrained_dir(config.model)
        self.dtype = config.torch_dtype(mc.torch_dtype)
        self.kv_dtype = config.kv_cache_torch_dtype(self.dtype)
        torch.manual_seed(config.seed)
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        fixed_pool_blocks = configured_pool_blocks(config, self._block_bytes(), self.device.type == "cuda")
        profile = GPUMemoryProfile(self.device) if fixed_pool_blocks is None else None
        self.model, _ = load_model(config.model, self.dtype, self.device, config.load_format, tp,
                                   quantization=config.quantization)
        self.lora = LoRAWeights(config, mc, self.model, self.dtype, self.device) if config.enable_lora else None
        # On worker ranks the engine's process decides the slots (`TPExecutor`) and sends them with each step.
        self.lora_slots = LoRASlots(config, mc) if config.enable_lora and not config.uses_workers else None
        self.num_kv_heads = kv_heads_of_rank(mc, tp)[1]
        self.block_size = config.block_size
        self.max_model_len = config.effective_max_model_len(mc)
        self.sampler = Sampler()
        self.inputs = InputBatch(-(-self.max_model_len // self.block_size), self.block_size, self.device)
        self.clock: StepClock | None = None  # set by `kvserve bench overhead` only
        scratch_bytes = self._warm_up(config.calculate_kv_scales) if profile or config.calculate_kv_scales else 0
        self.num_kv_blocks = fixed_pool_blocks or self._profiled_pool_blocks(profile, scratch_bytes)
        # One block past the pool's: the padding rows of a decode graph's batch use it alone.
        self.kv_caches = self._allocate_kv_caches(self.num_kv_blocks + 1, self.kv_dtype)
        self.num_host_kv_blocks = host_blocks_for(config.kv_offload_gib, self._block_bytes())
        self.host_tier = HostKVTier(self.kv_caches, self.num_host_kv_blocks) if self.num_host_kv_blocks else None
        self._log_memory(tp)
        self.graphs = None
        # A decode graph would not see which adapter each row uses: with LoRA the model runs eagerly.
        if self.device.type == "cuda" and not config.enforce_eager and tp.size == 1 and self.lora is None:
            self.graphs = self.decode_graphs()
            with torch.inference_mode():
                self.graphs.capture()

    def _log_memory(self, tp: TPGroup) -> None:
        weights = sum(p.nbytes for p in self.model.parameters())
        kv = sum(k.nbytes + v.nbytes for k, v in self.kv_caches)
        logger.info(
            "rank %d of %d on %s: weights %.2f GiB, KV cache %.2f GiB (%d blocks of %d tokens, %s)",
            tp.rank, tp.size, self.device, weights / GIB, kv / GIB, self.num_kv_blocks, self.block_size,
            str(self.kv_dtype).removeprefix("torch."),
        )

    def _profiled_pool_blocks(self, profile: GPUMemoryProfile, scratch_bytes: int) -> int:
        """The blocks that fit in the share of the GPU that `gpu_memory_utilization` leaves
        beside the warm-up's peak (less its scratch KV cache) and a draft model loaded after
        this runner, each with the draft's KV block beside it."""
        peak_used = profile.peak_used() - scratch_bytes
        return blocks_for_gpu(
            profile.total, profile.free_at_start, peak_used, self.config.gpu_memory_utilization, self._block_bytes(),
            draft_memory(self.config),
        )

    def decode_graphs(self) -> DecodeGraphs:
        """Padded decode steps over this runner's model and KV cache, not yet captured."""
        return DecodeGraphs(
            lambda input_ids, positions, meta: self.model(input_ids, positions, self.kv_caches, meta),
            self.config.max_num_seqs, self.max_model_len, self.block_size, self.num_kv_blocks,
            self.model_config.hidden_size, self.dtype, self.device,
        )

    def _block_bytes(self) -> int:
        return rank_block_bytes(self.config, self.model_config, self.kv_dtype)

    def _allocate_kv_caches(self, num_blocks: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mc = self.model_config
        shape = (num_blocks, self.block_size, self.num_kv_heads, mc.head_dim)
        # Zeroed: padded reads of unused slots must never meet NaN garbage.
        return [
            (torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(mc.num_layers)
        ]

    @torch.inference_mode()
    def _warm_up(self, calibrate_kv_scales: bool) -> int:
        """The largest step: one forward of `max_num_batched_tokens` random tokens, and sampling
        for as many rows as a step may sample, over a scratch KV cache in the model's dtype;
        returns the scratch cache's bytes. With `calibrate_kv_scales` every layer sets its FP8
        scales from the K and V it saw."""
        attention = [layer.self_attn for layer in self.model.layers]
        for layer in attention:
            layer.calibrate_kv_scales = calibrate_kv_scales
        num_tokens = self.config.max_num_batched_tokens
        chunks, num_blocks = _random_prompts(num_tokens, self.max_model_len, self.block_size, self.model_config.vocab_size)
        input_ids, positions, meta = flat_inputs(chunks, self.block_size, self.device)
        caches = self._allocate_kv_caches(num_blocks, self.dtype)
        hidden = self.model(input_ids, positions, caches, meta)
        for layer in attention:
            layer.calibrate_kv_scales = False
        num_rows = min(self.config.max_num_seqs, num_tokens)
        rows = [SamplingRow(SamplingParams(), [0], 1)] * num_rows
        self.sampler(self.model.compute_logits(hidden[:num_rows]), rows)
        return sum(k.nbytes + v.nbytes for k, v in caches)

    def add_lora(self, name: str, folder: str) -> None:
        self.lora_slots.add(name, folder)
        self.lora.forget(name)

    def remove_lora(self, name: str) -> None:
        self.lora_slots.remove(name)
        self.lora.forget(name)

    def resident_loras(self) -> tuple[str, ...]:
        return self.lora_slots.resident()

    async def check_health(self) -> None:
        """Nothing to check: the model runs in this process."""

    def shutdown(self) -> None:
        """Nothing to release beyond this process."""

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = to_device([s for s, _ in copies], torch.long, self.device)
        dst = to_device([d for _, d in copies], torch.long, self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def execute(self, step: StepRequest) -> SamplerOutput | None:
        self._transfer(step)
        plan = self._with_lora_slots(self.inputs.plan(step), step)
        if self.clock is not None:
            self.clock.lap("inputs")
        return self.run(plan, drawn_proposals(step.samples) if step.speculative else [])

    def launch(self, step: StepRequest, previous: "LaunchedStep | None") -> "LaunchedStep":
        """The step queued on the device, its pending input tokens taken from `previous`'s
        sampled ones there; nothing waits for it until `LaunchedStep.result`."""
        previous_tokens = previous.sampled.token_ids if previous is not None and previous.sampled else None
        self._transfer(step)
        plan = self._with_lora_slots(self.inputs.plan(step, previous_tokens), step)
        return LaunchedStep(self._sample(plan))

    def _with_lora_slots(self, plan: StepPlan, step: StepRequest) -> StepPlan:
        """`plan` with the LoRA slot of each of its tokens, every adapter of the step resident."""
        if self.lora_slots is not None:
            slots = self.lora_slots.assign([seq.lora_name for seq in step.batch.seqs], self.lora.load)
            plan.lora_slots = token_slots(slots, step.batch.num_new_tokens, self.device)
        return plan

    def _transfer(self, step: StepRequest) -> None:
        """Copies between the device's cache and the host tier, queued before the step's forward."""
        if step.batch.kv_transfers:
            self.host_tier.apply(step.batch.kv_transfers)

    def run(self, plan: StepPlan, proposals: list[DrawnProposal] = ()) -> SamplerOutput | None:
        """The step; `proposals` are those of its samples that a draft model drew."""
        sampled = self._sample(plan, proposals)
        if sampled is None:
            return None
        output = sampled.output()
        if self.clock is not None:
            self.clock.lap("sampling")
        return output

    @torch.inference_mode()
    def _sample(self, plan: StepPlan, proposals: list[DrawnProposal] = ()) -> SampledTokens | None:
        """The step's forward pass, sampling, pooling and prompt scoring, queued on the device;
        None when it has none of these for this rank to hand back (a rank other than the first
        of a tensor-parallel group only takes part in gathering logits)."""
        hidden = self._forward(plan)
        pooled = pool_chunks(hidden, *zip(*plan.pooled), self.config.pooling) if plan.pooled else None
        scored = score_prompts(self.model.compute_logits, hidden, plan.prompt_scoring) if plan.prompt_scoring else None
        logits = self._logits(hidden, plan)
        if self.clock is not None:
            self.clock.lap("forward")
        if plan.rows is None:
            return None
        if logits is None:
            return SampledTokens.nothing_sampled(pooled, scored) if pooled is not None or scored is not None else None
        drafted = proposal_logits(logits, proposals) if proposals else None
        sampled = self.sampler.sample(logits, plan.rows, plan.eos_token_ids, plan.token_masks, plan.draft_positions)
        if proposals:
            verify_drawn(sampled, drafted, proposals)
        sampled.pooled, sampled.prompt_scores = pooled, scored
        return sampled

    def logits(self, plan: StepPlan) -> torch.Tensor | None:
        """The forward pass of a step and the logits of its `last_rows`: all queued on the
        device, none waited for."""
        return self._logits(self._forward(plan), plan)

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        """The final hidden state of every token of the step."""
        self.copy_blocks(plan.block_copies)
        if self.lora is not None:
            self.lora.tokens.slot_of_token = plan.lora_slots
        if self.graphs is not None and self.graphs.covers(plan.meta):
            return self.graphs.run(plan.input_ids, plan.positions, plan.meta)
        return self.model(plan.input_ids, plan.positions, self.kv_caches, plan.meta)

    def _logits(self, hidden: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        if not len(plan.last_rows):
            return None
        return self.model.compute_logits(hidden[to_device(plan.last_rows, torch.long, self.device)])


def _random_prompts(num_tokens: int, max_len: int, block_size: int, vocab_size: int) -> tuple[list[Chunk], int]:
    """Whole prompts of random tokens, `num_tokens` in all, at most `max_len` each, over blocks
    0, 1, 2, ...; and the number of blocks they fill."""
    generator = torch.Generator().manual_seed(0)
    chunks, num_blocks = [], 0
    for start in range(0, num_tokens, max_len):
        length = min(max_len, num_tokens - start)
        blocks = list(range(num_blocks, num_blocks - (-length // block_size)))
        chunks.append((torch.randint(vocab_size, (length,), generator=generator).tolist(), 0, blocks))
        num_blocks += len(blocks)
    return chunks, num_blocks
