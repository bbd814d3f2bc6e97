"""Running the model: in the engine's process, or on tensor-parallel worker actors."""

from kvserve.workers.engine.config import EngineConfig
from kvserve.workers.engine.engine import LLMEngine
from kvserve.workers.engine.executor import ModelExecutor


def make_executor(config: EngineConfig) -> ModelExecutor:
    """The model in this process, or spread over `tp_size` worker actors."""
    if not config.uses_workers:
        from kvserve.workers.runner.model_runner import ModelRunner

        return ModelRunner(config)
    from kvserve.workers.runner.tp_executor import TPExecutor  # Ray is needed only here

    return TPExecutor(config)


def start_engine(config: EngineConfig) -> LLMEngine:
    """An engine over the executor its config asks for, with its draft model if it speculates
    with one."""
    if config.speculative is None or config.speculative.method != "draft":
        return LLMEngine(config, make_executor(config))
    from kvserve.workers.runner.draft_model import DraftModelRunner, check_draft_device

    check_draft_device(config)  # before the ranks start
    executor = make_executor(config)
    try:
        draft_model = DraftModelRunner(config, executor.model_config, executor.num_kv_blocks)
    except BaseException:
        executor.shutdown()
        raise
    return LLMEngine(config, executor, draft_model)
