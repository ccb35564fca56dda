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


class HFBackend:
    """transformers in-process, for small models and tests. One item at a time, each sampled after
    seeding with its own (run, item) seed: a reply does not depend on which items run beside it or
    in which order.

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

    Raises:
        InputError: The tokenizer has no chat template.
        ShiftSidecarError: The shift does not fit the model's layers.
        ValueError: `dtype` is not one of the four.
    """

    concurrency = 1

    def __init__(self, model_dir: str | os.PathLike, sampling: SamplingSettings, *,
                 chat_template_kwargs: dict | None = None, dtype: str = "auto",
                 device: str | None = None, trust_remote_code: bool = False,
                 max_context_tokens: int | None = None, shift=None):
        import torch
        import transformers

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
        self._lock = threading.Lock()  # one forward at a time: the global RNG is seeded per item
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

    def generate_sync(self, messages: list[dict], seed: int, language: str | None = None) -> str:
        """The model's reply to a chat, sampled after seeding torch with `seed` (greedy at
        temperature 0), one request at a time.

        Args:
            messages: The chat, `[{"role": ..., "content": ...}]`.
            seed: The request's sampling seed.
            language: The item's language (the shift's); None: no shift.
        """
        import torch

        input_ids = self._encode(self.chat_text(messages))
        s = self.sampling
        kwargs = dict(do_sample=s.temperature > 0, max_new_tokens=s.max_new_tokens,
                      pad_token_id=(self.tokenizer.pad_token_id
                                    if self.tokenizer.pad_token_id is not None
                                    else self.tokenizer.eos_token_id))
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
            if s.top_k is not None:
                kwargs["top_k"] = s.top_k
        with self._lock, torch.no_grad(), self.language_shift(language):
            torch.manual_seed(seed)
            out = self.lm.generate(input_ids=input_ids,
                                   attention_mask=torch.ones_like(input_ids), **kwargs)
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    async def generate(self, messages: list[dict], seed: int,
                       language: str | None = None) -> str:
        """`generate_sync` in a worker thread.

        Args:
            messages: The chat.
            seed: The request's sampling seed.
            language: The item's language; None: no shift.

        Returns:
            The reply text.
        """
        return await asyncio.to_thread(self.generate_sync, messages, seed, language)

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
