"""Where the model's replies come from: an OpenAI-compatible server, or transformers in-process.

Both take the chat (one user turn) and a seed per (run, item), and return the reply text. The chat
template is the model's: the server applies it (vLLM: `vllm serve <export dir>`), or the in-process
backend does with the tokenizer's `apply_chat_template`; `chat_template_kwargs` (e.g. Qwen3's
`{"enable_thinking": false}`) reach it either way.

Each request names its item's language: the in-process backend of a ShifCon export
(`sara.language_shift`) shifts the model's hidden states by that language's vectors, as training
did; a server cannot, and ignores it (tools/evaluate.py refuses a served ShifCon export unless told
to evaluate it unshifted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from typing import Protocol, Sequence

from sara_megatron.tool_errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The paper's protocol: temperature 0.1, top-p 1. top_k None leaves the model's default
    (vLLM and transformers both read it from the model's generation_config.json)."""

    temperature: float = 0.1
    top_p: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 2048

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# A served model's tokenizer is not at hand, so its limit is on characters: far above any real
# benchmark prompt (BELEBELE's, the longest, are a few thousand), below what breaks a request.
DEFAULT_MAX_PROMPT_CHARS = 1_000_000


class GenerationBackend(Protocol):
    """What the evaluation asks of a backend.

    Attributes:
        model: The model's name, as recorded with the results.
        concurrency: How many requests may be in flight at once.
    """

    model: str
    concurrency: int

    async def generate(self, messages: list[dict], seed: int,
                       language: str | None = None) -> str:
        """The model's reply to a chat.

        Args:
            messages: The chat, `[{"role": ..., "content": ...}]` (one user turn).
            seed: The sampling seed of this (run, item).
            language: The item's language (a ShifCon model's shift); None: none.
        """

    def prompt_too_long(self, messages: list[dict], reply_tokens: int | None = None) -> str | None:
        """Why the prompt cannot fit the model's context with `reply_tokens` after it, or None
        when it fits.

        Args:
            messages: The chat.
            reply_tokens: The reply's length in tokens; None: the most a generated reply may have.
        """

    def context_rule(self, reply_tokens: int | None = None) -> str:
        """The rule `prompt_too_long` applies, in words.

        Args:
            reply_tokens: As for `prompt_too_long`.
        """

    async def aclose(self) -> None:
        """Release the backend's connections or model."""


def prompt_characters(messages: list[dict]) -> int:
    """The number of characters of the chat's message contents, all together.

    Args:
        messages: The chat, `[{"role": ..., "content": ...}]`.
    """
    return sum(len(m.get("content") or "") for m in messages)


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server through `sara_megatron.chat.ChatClient`
    (bounded concurrency; retries on 429 with Retry-After, 5xx, dropped connections, bad bodies).
    A request that still fails raises `ChatRequestFailed`: it is never scored.

    Args:
        base_url: The server's OpenAI API root (e.g. `http://localhost:8000/v1`).
        model: The served model's name.
        sampling: The sampling settings.
        concurrency: Requests in flight at most.
        chat_template_kwargs: Passed to the server's chat template (e.g. Qwen3's
            `{"enable_thinking": False}`); None: none.
        max_retries: Further attempts after a request's first.
        timeout_s: One request's timeout, in seconds.
        api_key_env: The environment variable holding the API key.
        backoff_base_s: The exponential backoff's first ceiling, in seconds.
        max_prompt_chars: The longest prompt sent, in characters.

    Raises:
        InputError: The model refuses the sampling settings (a reasoning model and temperature).
        ValueError: concurrency < 1, max_retries < 0, or no API key where one is required.
    """

    def __init__(self, base_url: str, model: str, sampling: SamplingSettings, *,
                 concurrency: int = 32, chat_template_kwargs: dict | None = None,
                 max_retries: int = 6, timeout_s: float = 600.0,
                 api_key_env: str = "OPENAI_API_KEY", backoff_base_s: float = 0.5,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS):
        from sara_megatron.chat.client import ChatClient

        self.model = model
        self.max_prompt_chars = max_prompt_chars
        self.concurrency = concurrency
        self.sampling = sampling
        extra_body = {}
        if chat_template_kwargs:
            extra_body["chat_template_kwargs"] = dict(chat_template_kwargs)
        if sampling.top_k is not None:
            extra_body["top_k"] = sampling.top_k
        self.extra_body = extra_body or None
        self.settings(0)  # a setting the model refuses (temperature on GPT-5) fails here, not later
        self.client = ChatClient(base_url, api_key_env=api_key_env, concurrency=concurrency,
                                 max_retries=max_retries, timeout_s=timeout_s,
                                 backoff_base_s=backoff_base_s)

    def settings(self, seed: int):
        """The `ChatSettings` of one request.

        Args:
            seed: The request's sampling seed.
        """
        from sara_megatron.chat.client import ChatSettings

        return ChatSettings(model=self.model, temperature=self.sampling.temperature,
                            top_p=self.sampling.top_p, max_tokens=self.sampling.max_new_tokens,
                            seed=seed, extra_body=self.extra_body)

    def prompt_too_long(self, messages: list[dict], reply_tokens: int | None = None) -> str | None:
        """Why the prompt is too long ("N characters"), or None when it has at most
        `max_prompt_chars` characters.

        Args:
            messages: The chat.
            reply_tokens: Not used: the served model's tokenizer is not here to count tokens.
        """
        chars = prompt_characters(messages)
        return f"{chars} characters" if chars > self.max_prompt_chars else None

    def context_rule(self, reply_tokens: int | None = None) -> str:
        """The rule `prompt_too_long` applies, in words.

        Args:
            reply_tokens: Not used.
        """
        return (f"a prompt of at most --max-prompt-chars {self.max_prompt_chars} characters (the "
                "served model's tokenizer is not here to count tokens)")

    async def generate(self, messages: list[dict], seed: int,
                       language: str | None = None) -> str:
        """The server's reply to a chat.

        Args:
            messages: The chat, `[{"role": ..., "content": ...}]`.
            seed: The request's sampling seed.
            language: Ignored: a server cannot shift a ShifCon model.

        Raises:
            ChatRequestFailed: The request still failed after its retries.
        """
        reply = await self.client.complete(messages, self.settings(seed))
        return reply.content

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()


def _torch_dtype(name: str):
    import torch

    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


@dataclasses.dataclass
class _GenerationRequest:
    """A chat waiting in `HFBackend` for its batch; `reply` gets the text."""
    messages: list[dict]
    seed: int
    language: str | None
    reply: asyncio.Future


class SeededGumbelNoise:
    """A logits processor: adds to each row's scores Gumbel noise drawn from a generator seeded
    with that row's seed, so that the argmax (greedy decoding) samples softmax(scores) row by row
    (the Gumbel-max trick) whatever the other rows are.

    Args:
        seeds: Each row's seed.
    """

    def __init__(self, seeds: Sequence[int]):
        import torch

        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids, scores):
        import torch

        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64)
                               for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform))  # uniform 0 gives -inf: never picked
        return scores.float() + gumbel.to(device=scores.device, dtype=torch.float32)


class HFBackend:
    """transformers in-process, for small models and tests. Requests of one language are
    generated `batch_size` at a time (left-padded); each row samples from a generator seeded with
    its own (run, item) seed (Gumbel-max over the warped logits), so a reply does not depend on
    which items run beside it, in which order, or on the batch size.

    Args:
        model_dir: The HF model folder (an export, or from the hub).
        sampling: The sampling settings.
        chat_template_kwargs: Passed to the tokenizer's chat template (e.g. Qwen3's
            `{"enable_thinking": False}`); None: none.
        dtype: "auto", "float32", "bfloat16" or "float16".
        device: Where the model runs; None: "cuda" when available, else "cpu".
        trust_remote_code: Let transformers run the folder's own model code.
        max_context_tokens: The context length in tokens; None: the config's
            max_position_embeddings.
        shift: A ShifCon export's shift (`language_shift.read_shift_sidecar(model_dir)`); each
            request's hidden states are then shifted by its language, as in training. None: no
            shift.
        batch_size: How many requests of one language are generated together (a tiny model on a
            CPU spends most of a decoding step in Python: 16 rows cost about what one does).

    Raises:
        InputError: The tokenizer has no chat template.
        ShiftSidecarError: The shift does not fit the model's layers.
        ValueError: `dtype` is not one of the four; `batch_size` < 1.
    """

    def __init__(self, model_dir: str | os.PathLike, sampling: SamplingSettings, *,
                 chat_template_kwargs: dict | None = None, dtype: str = "auto",
                 device: str | None = None, trust_remote_code: bool = False,
                 max_context_tokens: int | None = None, shift=None, batch_size: int = 1):
        import torch
        import transformers

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.concurrency = batch_size  # the runner keeps this many requests waiting to be batched
        self._pending: list[_GenerationRequest] = []
        self._batcher: asyncio.Task | None = None

        self.model_dir = os.fspath(model_dir)
        self.model = os.path.basename(os.path.normpath(self.model_dir))
        self.sampling = sampling
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            self.model_dir, trust_remote_code=trust_remote_code)
        if self.tokenizer.chat_template is None:
            raise InputError(f"{self.model_dir}: the tokenizer has no chat template")
        self.lm = transformers.AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code)
        self.lm.to(self.device).eval()
        self.shift = shift
        self._layers = {}
        if shift is not None:
            from sara_megatron.sara.language_shift import check_shift_fits, hf_decoder_layers

            self._layers = hf_decoder_layers(self.lm)
            check_shift_fits(shift, len(self._layers), self.model_dir)
        self._lock = threading.Lock()  # one forward at a time (the shift hooks are per language)
        self._set_context(max_context_tokens)

    def _set_context(self, max_context_tokens: int | None) -> None:
        """The context rule: prompt tokens (chat template applied) + the reply's must fit the
        model's positions. A prompt with more characters than the context's tokens could hold
        (each token at most the vocabulary's longest, in characters; times 4 for normalizers
        that merge characters) is refused without being tokenized: tokenizing a 50 MB prompt
        aborts the process inside the Rust tokenizer."""
        positions = getattr(self.lm.config.get_text_config(), "max_position_embeddings", None)
        self.context_tokens = max_context_tokens or positions
        self.context_source = (
            "--max-context-tokens" if max_context_tokens
            else f"max_position_embeddings in {os.path.join(self.model_dir, 'config.json')}")
        if self.context_tokens is None:
            self.max_prompt_chars = DEFAULT_MAX_PROMPT_CHARS
            return
        longest_token = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = 4 * self.context_tokens * max(longest_token, 1)

    def context_rule(self, reply_tokens: int | None = None) -> str:
        """The rule `prompt_too_long` applies, in words.

        Args:
            reply_tokens: The scored reply's length in tokens; None: --max-new-tokens.
        """
        if self.context_tokens is None:
            return (f"the model's config has no max_position_embeddings: a prompt of at most "
                    f"{self.max_prompt_chars} characters (--max-context-tokens sets a limit in "
                    "tokens)")
        reply = (f"--max-new-tokens {self.sampling.max_new_tokens}" if reply_tokens is None
                 else f"{reply_tokens} scored token(s)")
        return (f"prompt tokens (chat template applied) + {reply} <= {self.context_tokens} "
                f"({self.context_source})")

    def prompt_too_long(self, messages: list[dict], reply_tokens: int | None = None) -> str | None:
        """Why the chat-templated prompt plus the reply does not fit the context, or None when it
        fits (a prompt of too many characters is refused before it is tokenized).

        Args:
            messages: The chat.
            reply_tokens: The reply's length in tokens; None: the sampling's max_new_tokens.
        """
        chars = prompt_characters(messages)
        if chars > self.max_prompt_chars:
            if self.context_tokens is None:
                return f"{chars} characters, more than {self.max_prompt_chars}"
            return (f"{chars} characters, more than the {self.max_prompt_chars} that "
                    f"{self.context_tokens} tokens can hold")
        if self.context_tokens is None:
            return None
        tokens = len(self.tokenizer(self.chat_text(messages), add_special_tokens=False)
                     ["input_ids"])
        reply = self.sampling.max_new_tokens if reply_tokens is None else reply_tokens
        if tokens + reply > self.context_tokens:
            return f"{tokens} tokens + {reply} > {self.context_tokens}"
        return None

    def chat_text(self, messages: list[dict]) -> str:
        """The chat rendered by the tokenizer's chat template, up to the generation prompt.

        Args:
            messages: The chat.
        """
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True,
                                                  **self.chat_template_kwargs)

    def _encode(self, text: str):
        import torch

        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], device=self.device)

    def language_shift(self, language: str | None):
        """Context: the model's forward shifted for `language` (nothing without a shift).

        Args:
            language: The item's language; None: no shift.
        """
        from sara_megatron.sara.language_shift import shifted

        return shifted(self._layers, self.shift, language)

    def _pad_id(self) -> int:
        """The id that pads prompts on the left: the tokenizer's pad token, else its end token."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def _end_ids(self) -> set[int]:
        """The ids that end a reply: the model's generation config's, else the tokenizer's."""
        eos = self.lm.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {eos}

    def _sampling_processors(self, seeds: Sequence[int]) -> list:
        """The logits processors that turn greedy decoding into seeded sampling: temperature,
        top-k (the model's generation config's when the settings leave it unset, as
        transformers' sampling does), top-p, then each row's Gumbel noise. None at temperature 0.

        Args:
            seeds: Each row's sampling seed.
        """
        import transformers

        s = self.sampling
        if s.temperature == 0:
            return []
        processors = [transformers.TemperatureLogitsWarper(s.temperature)]
        top_k = s.top_k if s.top_k is not None else self.lm.generation_config.top_k
        if top_k:
            processors.append(transformers.TopKLogitsWarper(top_k))
        if s.top_p < 1:
            processors.append(transformers.TopPLogitsWarper(s.top_p))
        processors.append(SeededGumbelNoise(seeds))
        return processors

    def generate_batch_sync(self, requests: Sequence[tuple[list[dict], int]],
                            language: str | None = None) -> list[str]:
        """The model's replies to several chats of one language, decoded together (left-padded);
        each reply is sampled with its own seed (greedy at temperature 0).

        Args:
            requests: (chat, sampling seed) pairs; a chat is `[{"role": ..., "content": ...}]`.
            language: The chats' language (the shift's); None: no shift.

        Returns:
            The reply texts, in the order of `requests`.
        """
        import torch
        import transformers

        prompts = [self.tokenizer(self.chat_text(messages), add_special_tokens=False)["input_ids"]
                   for messages, _ in requests]
        width = max(map(len, prompts))
        pad = self._pad_id()
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts],
                                 device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                      device=self.device)
        end_ids = self._end_ids()
        # A config of its own: decoding is greedy over the processors' scores, whatever sampling
        # the model's generation_config.json asks for.
        config = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=self.sampling.max_new_tokens, pad_token_id=pad,
            eos_token_id=sorted(end_ids))
        processors = transformers.LogitsProcessorList(
            self._sampling_processors([seed for _, seed in requests]))
        with self._lock, torch.no_grad(), self.language_shift(language):
            out = self.lm.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   generation_config=config, logits_processor=processors)
        replies = []
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in end_ids), len(row))
            replies.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return replies

    def generate_sync(self, messages: list[dict], seed: int, language: str | None = None) -> str:
        """The model's reply to one chat (`generate_batch_sync` of one request).

        Args:
            messages: The chat, `[{"role": ..., "content": ...}]`.
            seed: The request's sampling seed.
            language: The item's language (the shift's); None: no shift.
        """
        return self.generate_batch_sync([(messages, seed)], language)[0]

    async def generate(self, messages: list[dict], seed: int,
                       language: str | None = None) -> str:
        """The reply, generated in a batch with the other requests of its language that are
        waiting (in a worker thread).

        Args:
            messages: The chat.
            seed: The request's sampling seed.
            language: The item's language; None: no shift.

        Returns:
            The reply text.
        """
        reply = asyncio.get_running_loop().create_future()
        self._pending.append(_GenerationRequest(messages, seed, language, reply))
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.create_task(self._generate_pending())
        return await reply

    async def _generate_pending(self) -> None:
        """Generate the waiting requests, a batch of one language at a time, until none waits.
        Before each batch it lets the event loop run until no new request arrives (the runner's
        other jobs queue theirs as soon as their previous reply is recorded)."""
        while self._pending:
            seen = -1
            while len(self._pending) < self.batch_size and len(self._pending) != seen:
                seen = len(self._pending)
                await asyncio.sleep(0)
            language = self._pending[0].language
            batch = [r for r in self._pending if r.language == language][:self.batch_size]
            for request in batch:
                self._pending.remove(request)
            batch = [r for r in batch if not r.reply.done()]  # a cancelled job's request
            if not batch:
                continue
            try:
                replies = await asyncio.to_thread(
                    self.generate_batch_sync, [(r.messages, r.seed) for r in batch], language)
            except Exception as error:  # each waiting job raises it (the pool decides)
                for request in batch:
                    if not request.reply.done():
                        request.reply.set_exception(error)
                continue
            for request, text in zip(batch, replies):
                if not request.reply.done():
                    request.reply.set_result(text)

    def continuation_logprobs(self, messages: list[dict], continuations: Sequence[str],
                              language: str | None = None) -> list[float]:
        """Sum of the log-probabilities of each continuation's tokens right after the chat's
        generation prompt (context and continuation tokenized apart, as lm-eval does), the model
        shifted for `language` when the backend has a shift.

        Args:
            messages: The chat.
            continuations: The candidate continuations.
            language: The item's language; None: no shift.

        Returns:
            One summed log-probability (nats) per continuation, in order.
        """
        import torch

        context = self._encode(self.chat_text(messages))
        scores = []
        with self._lock, torch.no_grad(), self.language_shift(language):
            for continuation in continuations:
                target = self._encode(continuation)
                ids = torch.cat([context, target], dim=1)
                logits = self.lm(input_ids=ids).logits[0, context.shape[1] - 1:-1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                scores.append(float(logprobs.gather(1, target[0].unsqueeze(1)).sum()))
        return scores

    async def aclose(self) -> None:
        """Nothing to release: the model stays loaded until the backend is dropped."""
        return None
