"""One model the ingress serves: its tokenizer and limits, the LLMServer deployment that runs it,
and that deployment's KV index. Prompts are checked, tokenized and hashed here, once, and handed
to the deployment through a handle whose request router picks the replica."""

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from jinja2 import TemplateError
from ray import serve
from ray.serve import context as serve_context
from ray.serve._private.common import ReplicaState
from ray.serve.handle import DeploymentHandle
from transformers import AutoTokenizer

from kvserve.router.errors import bad_request, refusal, replica_died
from kvserve.router.kv_follower import KVIndexFollower
from kvserve.router.kv_scoring import forget_refused_send
from kvserve.router.openai_schema import ChatCompletionRequest, EmbeddingRequest, TokenizeRequest
from kvserve.router.reasoning import CLOSE, OPEN, thinking_start
from kvserve.router.responses import TokenText
from kvserve.router.tool_parsers import FORMATS, format_for_model
from kvserve.workers.engine.block_hash import hash_block_chain, hash_check_value
from kvserve.workers.lora_registry import get_or_create_registry
from kvserve.workers.protocol import (
    BlockHash, EmbeddingOutput, EmbedRequest, GenerateRequest, RequestRefused, SamplingParams, ThinkingBudget,
    prompt_length_problem,
)

LLM_DEPLOYMENT = "LLMServer"
REPLICA_RETRIES = 2  # sends of a request whose replica died before its first output
# Prompts this long in all (characters, or token ids x 4) are tokenized and hashed on a worker
# thread. A 32k-token prompt takes tens of milliseconds, which on the event loop would stall
# every stream and routing decision of the ingress replica meanwhile; shorter ones take less
# than the hop to a thread. One thread, taking the prompts in turn: the tokenizers let go of
# the GIL while they encode, but the rest holds it, and the loop waits at most one switch
# interval for one thread, several for several (docs/benchmarks.md, "Preparing a prompt").
OFF_LOOP_PROMPT_CHARS = 8192
_PREPARER = ThreadPoolExecutor(1, thread_name_prefix="kvserve-prompts")


@dataclass(frozen=True)
class IngressSettings:
    served_model_name: str
    block_size: int
    max_model_len: int
    tokenizer: str  # folder
    tokenizer_gguf_file: str | None  # the GGUF file in that folder whose metadata holds the tokenizer
    api_key: str | None
    vocab_size: int  # the model's: token ids from clients must be below it
    hidden_size: int  # the model's: the length of an embedding
    normalize_embeddings: bool
    max_n: int
    max_stop_strings: int
    max_request_bytes: int
    metrics_need_api_key: bool
    tool_parser: str | None = None  # a name in tool_parsers.FORMATS; None: the model's own
    reasoning_parser: str | None = None  # a name in reasoning.PARSERS; None: the thinking stays in the content
    enable_lora: bool = False
    lora_modules: dict[str, str] = field(default_factory=dict)  # the adapters of startup: name -> folder
    kv_event_hubs: int = 1  # ServingConfig.event_hubs()


async def _off_loop_if_long(size: int, work, *args, **kwargs):
    """`work(*args, **kwargs)`, on the worker thread if `size` (characters) reaches `OFF_LOOP_PROMPT_CHARS`."""
    if size < OFF_LOOP_PROMPT_CHARS:
        return work(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_PREPARER, functools.partial(work, *args, **kwargs))


def model_app_name(ingress_app: str, served_model_name: str) -> str:
    """The Serve application of one model of several: its LLMServer deployment alone, beside the
    ingress's application, so that adding or removing a model leaves the others' replicas alone."""
    return f"{ingress_app}-{served_model_name}"


def _route_on_its_own(request_id: str) -> None:
    """Give the calls this task makes a Serve request id of their own. Serve's request router
    hands the replica it chose for a request to the pending request of the same id, and the
    calls of one HTTP request (several prompts or inputs) share that request's id: all but
    one of them would never be routed. Each prompt runs in a task of its own (asyncio.gather),
    so the id set here stays with that task's calls."""
    serve_context._set_request_context(_internal_request_id=request_id)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as the ingress sends it on: its text, its token ids, its blocks' hashes."""

    text: str
    ids: list[int]
    block_hashes: list[BlockHash]


@dataclass(frozen=True)
class LoRAChoice:
    """The LoRA adapter a request runs under: its name and folder."""

    name: str
    path: str


class ServedModel:
    def __init__(self, settings: IngressSettings, llm: DeploymentHandle, llm_app: str):
        self.settings = settings
        self.name = settings.served_model_name
        self.llm = llm
        self.llm_app = llm_app  # the Serve application of `llm`, whose KV event hub we follow
        self.block_size = settings.block_size
        self.max_model_len = settings.max_model_len
        self.hash_check = hash_check_value(self.block_size)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer, local_files_only=True,
                                                       gguf_file=settings.tokenizer_gguf_file)
        self.token_text = TokenText(self.tokenizer)
        self.tool_format = (FORMATS[settings.tool_parser] if settings.tool_parser
                            else format_for_model(settings.tokenizer, self.tokenizer.chat_template))
        # The tokens that open and end a reasoning model's thinking, where the vocabulary has them whole.
        vocabulary = self.tokenizer.get_vocab() if settings.reasoning_parser else {}
        self.thinking_open, self.thinking_end = vocabulary.get(OPEN), vocabulary.get(CLOSE)
        self.follower: KVIndexFollower | None = None
        self.lora_registry = get_or_create_registry(llm_app, settings.lora_modules) if settings.enable_lora else None

    @property
    def thinking_tags(self) -> tuple[int, int] | None:
        """The token ids that open and close the thinking, where the vocabulary has both whole."""
        if self.thinking_open is None or self.thinking_end is None:
            return None
        return self.thinking_open, self.thinking_end

    @classmethod
    def in_own_app(cls, settings: IngressSettings, ingress_app: str) -> "ServedModel":
        app_name = model_app_name(ingress_app, settings.served_model_name)
        # The model's application may be deployed after ours (one `serve deploy` starts both).
        llm = serve.get_deployment_handle(LLM_DEPLOYMENT, app_name, _check_exists=False)
        return cls(settings, llm, app_name)

    def ensure_follower(self) -> KVIndexFollower:
        if self.follower is None:
            self.follower = KVIndexFollower.for_app(self.llm_app, self.block_size, self.settings.kv_event_hubs)
        self.follower.ensure_running()
        return self.follower

    def running_replicas(self) -> int:
        """LLMServer replicas the Serve controller reports RUNNING: the set the handle's router
        sends requests to, so one request can be served as soon as this is above zero."""
        app_status = serve.status().applications.get(self.llm_app)
        deployment = app_status.deployments.get(self.llm.deployment_name) if app_status else None
        return deployment.replica_states.get(ReplicaState.RUNNING, 0) if deployment else 0

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "kvserve", "root": self.name,
                "parent": None, "max_model_len": self.max_model_len, "vocab_size": len(self.tokenizer)}

    async def lora_folders(self) -> dict[str, str]:
        """Every adapter served now, name -> folder."""
        return await self.lora_registry.folders.remote() if self.lora_registry else {}

    async def lora_cards(self) -> list[dict]:
        return [{**self.card(), "id": name, "root": folder, "parent": self.name}
                for name, folder in (await self.lora_folders()).items()]

    async def lora_folder(self, name: str) -> str | None:
        """The folder of adapter `name`, if it is served."""
        return await self.lora_registry.folder.remote(name) if self.lora_registry else None

    # -- checks ------------------------------------------------------------------------

    async def prepare(self, prompts: list[str | list[int]], cache_salt: str | None, lora_name: str | None = None,
                      add_special_tokens: bool = True, keep_last: int | None = None) -> list[Prompt]:
        """`prepare_now`, on the worker thread if the prompts are long."""
        size = sum(len(p) if isinstance(p, str) else 4 * len(p) for p in prompts)
        return await _off_loop_if_long(size, self.prepare_now, prompts, cache_salt, lora_name, add_special_tokens,
                                       keep_last)

    async def token_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        """The token ids of `text`, however long (for /tokenize), on the worker thread if it is long."""
        return await _off_loop_if_long(len(text), self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    def token_count(self, text: str) -> int:
        """The tokens of a piece of output text, tokenized again (the reasoning's share of an output)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def text_of(self, ids: list[int], param: str) -> str:
        """The text of token ids a client sent as `param` (for /detokenize)."""
        self._check_token_ids(ids, param)
        return await _off_loop_if_long(4 * len(ids), self.tokenizer.decode, ids)

    def prepare_now(self, prompts: list[str | list[int]], cache_salt: str | None, lora_name: str | None = None,
                    add_special_tokens: bool = True, keep_last: int | None = None) -> list[Prompt]:
        """Each prompt tokenized (`tokenize`) and its blocks hashed as the replicas hash them
        (under `cache_salt` and LoRA adapter `lora_name`)."""
        prepared = []
        for prompt in prompts:
            text, ids = self.tokenize(prompt, add_special_tokens, keep_last)
            prepared.append(Prompt(text, ids, hash_block_chain(ids, self.block_size, cache_salt, lora_name)))
        return prepared

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True,
                 keep_last: int | None = None) -> tuple[str, list[int]]:
        """The prompt's text and token ids, only its last `keep_last` tokens if given
        (`truncate_prompt_tokens`); a bad request if they do not fit the model."""
        if keep_last is not None and keep_last > self.max_model_len:
            raise bad_request(f"truncate_prompt_tokens {keep_last} exceeds max_model_len {self.max_model_len}",
                              "truncate_prompt_tokens")
        if isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), prompt
        else:
            self._check_token_ids(prompt, "prompt")
            ids, text = list(prompt), None
        if keep_last is not None and len(ids) > keep_last:
            ids, text = ids[-keep_last:], None
        problem = prompt_length_problem(len(ids), self.max_model_len)
        if problem is not None:
            raise bad_request(problem, "prompt")
        return (text if text is not None else self.tokenizer.decode(ids)), ids

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        """Before anything decodes them: an id a tokenizer cannot hold raises OverflowError."""
        bad = next((t for t in ids if not 0 <= t < self.settings.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} in {param} is outside the vocabulary "
                              f"[0, {self.settings.vocab_size})", param)

    def check_sampling_limits(self, body) -> None:
        """The server's limits, which the schema cannot know."""
        if body.n > self.settings.max_n:
            raise bad_request(f"n must be <= {self.settings.max_n}", "n")
        if body.stop and len(body.stop) > self.settings.max_stop_strings:
            raise bad_request(f"stop may hold at most {self.settings.max_stop_strings} strings", "stop")
        if body.top_k is not None and body.top_k > self.settings.vocab_size:
            raise bad_request(f"top_k must be <= the vocabulary size {self.settings.vocab_size}", "top_k")
        self._check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        self._check_token_ids(list(body.logit_bias or ()), "logit_bias")
        self._check_token_ids(body.allowed_token_ids or [], "allowed_token_ids")

    def after_thinking(self, sampling: SamplingParams, prompt: Prompt, body: ChatCompletionRequest) -> SamplingParams:
        """`sampling` for a reasoning model (`serving.reasoning_parser`) whose output may start
        with its thinking (the prompt did not close it): its structured output holds only after
        the thinking's end token, and `thinking_token_budget` bounds the thinking. Both need that
        token whole in the vocabulary; without it the grammar holds from the start, and a
        budget is refused. Where the output opens the thinking itself or skips it (Qwen3's), both
        wait only for an output that opens with the opening token; a vocabulary without it whole
        leaves them waiting from the start. Without a reasoning parser there is no thinking."""
        budget, parser = body.thinking_token_budget, self.settings.reasoning_parser
        if parser is None:
            return sampling
        start = thinking_start(parser, prompt.text)
        if start is False:
            return sampling
        if budget is not None and self.thinking_end is None:
            raise bad_request(f"thinking_token_budget needs {CLOSE!r} to be one token of the model's vocabulary "
                              "(it is forced when the budget runs out), and this tokenizer has no such token",
                              "thinking_token_budget")
        opener = self.thinking_open if start is None else None
        update = {}
        if sampling.structured is not None and self.thinking_end is not None:
            update["structured"] = sampling.structured.model_copy(
                update={"after_token_id": self.thinking_end, "opened_by_token_id": opener})
        if budget is not None:
            update["thinking_budget"] = ThinkingBudget(end_token_id=self.thinking_end, max_tokens=budget,
                                                       opened_by_token_id=opener)
        return sampling.model_copy(update=update) if update else sampling

    def check_dimensions(self, body: EmbeddingRequest) -> None:
        if body.dimensions is not None and body.dimensions > self.settings.hidden_size:
            raise bad_request(f"dimensions must be <= the model's embedding size {self.settings.hidden_size}",
                              "dimensions")

    def chat_prompt(self, body: ChatCompletionRequest | TokenizeRequest) -> str:
        if not self.tokenizer.chat_template:
            raise bad_request("this model's tokenizer has no chat template", "messages")
        messages = [m.for_template() for m in body.messages]
        try:
            return self.tokenizer.apply_chat_template(messages, tools=body.template_tools(), tokenize=False,
                                                      **body.template_options())
        except (TemplateError, TypeError, ValueError) as error:
            raise bad_request(f"the model's chat template cannot take these messages: {error}", "messages") from None

    def max_tokens(self, ids: list[int], asked: int | None) -> int:
        room = self.max_model_len - len(ids)
        if asked is not None and asked > room:
            raise bad_request(f"max_tokens {asked} plus the prompt's {len(ids)} tokens exceed "
                              f"max_model_len {self.max_model_len}", "max_tokens")
        return asked or room

    # -- sending -----------------------------------------------------------------------

    async def embed(self, request_id: str, prompt: Prompt, cache_salt: str | None, priority: int) -> EmbeddingOutput:
        """One prompt's embedding; sent again, to a live replica, if its replica died first."""
        _route_on_its_own(request_id)
        request = EmbedRequest(request_id, prompt.ids, prompt.text, prompt.block_hashes, self.hash_check,
                               cache_salt, priority)
        _, answer = await self._first_answer(lambda: self.llm.options(stream=True).embed.remote(request),
                                             prompt.block_hashes)
        return answer

    async def start(self, request_id: str, prompt: Prompt, sampling: SamplingParams, body,
                    lora: LoRAChoice | None = None):
        """The stream of one prompt and its first delta, under `lora` if given (the prompt
        `prepare`d under it). A replica that dies before the first delta has given the client
        nothing: the request goes again, to a live replica."""
        _route_on_its_own(request_id)
        lora_name, lora_path = (lora.name, lora.path) if lora else (None, None)
        request = GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt.ids,
            sampling=sampling,
            prompt=prompt.text,
            block_hashes=prompt.block_hashes,
            hash_check=self.hash_check,
            cache_salt=body.cache_salt,
            priority=body.priority,
            kv_retention=body.retention(),
            lora_name=lora_name,
            lora_path=lora_path,
        )
        return await self._first_answer(lambda: self.llm.options(stream=True).generate.remote(request),
                                        prompt.block_hashes)

    async def _first_answer(self, send, block_hashes: list[BlockHash]):
        """The stream `send()` opens for a prompt of `block_hashes`, and its first item; sent
        again if its replica died first."""
        for attempt in range(REPLICA_RETRIES + 1):
            stream = send()
            try:
                first = await anext(stream)
            except BaseException as error:
                stream.cancel()
                if not replica_died(error) or attempt == REPLICA_RETRIES:
                    raise
                continue
            if isinstance(first, RequestRefused):
                stream.cancel()
                forget_refused_send(self.llm_app, first.replica, block_hashes)
                raise refusal(first.reason, first.overloaded)
            return stream, first

