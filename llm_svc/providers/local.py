"""The built-in local model "local": deterministic, offline, paced like a real stream.

The answer is a pure function of the prompt (`compose_answer`), so other services' tests can
compute the exact content a generation will produce. Tokens are word-sized and carry their
leading whitespace, so joining them gives the text back exactly.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from llm_svc.providers.base import Finish, ProviderEvent, ProviderRequest, TextDelta, TokenUsage

PROVIDER_NAME = "local"
QUOTE_WORDS = 12  # words of the prompt quoted back
# The "local" model's max_tokens in models.toml; a max_tokens of 0 or less means it, as in
# GenerationOptions. Answers are shorter than this, so 0 means "the whole answer".
DEFAULT_MAX_TOKENS = 256
KEY_WORDS = 3

_TOKEN = re.compile(r"\s*\S+")
_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")

# Picked by a stable digest of the prompt (not `hash()`, which is salted per process).
_OPENERS = (
    "Here is what the local model makes of it.",
    "A quick, offline answer follows.",
    "Thanks for the question; here is a local reply.",
    "Answering from the built-in model, without any provider.",
)
_CLOSERS = (
    "Configure a provider key for a real model; this one only echoes and counts.",
    "A real provider would go much further; set its key to use one.",
    "This reply is deterministic, so tests can predict every token of it.",
    "Each token arrives separately, so progress and streaming can be watched.",
)


def tokenize(text: str) -> list[str]:
    """Word-sized tokens, each with the whitespace before it; `"".join` gives `text` back
    (less trailing whitespace)."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    return len(tokenize(text))


def _key_words(prompt: str) -> list[str]:
    seen: dict[str, str] = {}
    for word in _WORD.findall(prompt):
        seen.setdefault(word.lower(), word)
    # Longest first, then alphabetical: stable for a given prompt.
    ranked = sorted(seen.values(), key=lambda w: (-len(w), w.lower()))
    return ranked[:KEY_WORDS]


def answer_text(prompt: str) -> str:
    """The full (untruncated) answer to `prompt`."""
    words = prompt.split()
    quoted = " ".join(words[:QUOTE_WORDS]) + (" …" if len(words) > QUOTE_WORDS else "")
    digest = hashlib.sha256(prompt.encode()).digest()
    opener = _OPENERS[digest[0] % len(_OPENERS)]
    closer = _CLOSERS[digest[1] % len(_CLOSERS)]
    keys = _key_words(prompt)
    if not keys:
        about = "It has no words to pick."
    elif len(keys) == 1:
        about = f"Its key word is {keys[0]}."
    else:
        about = f"Its key words are {', '.join(keys)}."
    plural = "" if len(words) == 1 else "s"
    return (
        f'{opener} You asked: "{quoted}". That prompt has {len(words)} word{plural} '
        f"and {len(prompt)} characters. {about} {closer}"
    )


def compose_answer(prompt: str, max_tokens: int = 0) -> list[str]:
    """The tokens the local model streams for `prompt`, at most `max_tokens` of them
    (0: the model's default, `DEFAULT_MAX_TOKENS`)."""
    return list(complete(prompt, max_tokens).tokens)


@dataclass(frozen=True)
class LocalCompletion:
    tokens: tuple[str, ...]
    finish_reason: str  # "length" when cut at max_tokens, else "stop"
    usage: TokenUsage

    @property
    def content(self) -> str:
        return "".join(self.tokens)


@functools.lru_cache(maxsize=1024)  # pure: asked twice per generation (estimate, stream)
def complete(prompt: str, max_tokens: int = 0, system: str = "") -> LocalCompletion:
    """Everything a local generation produces: tokens, finish reason, usage."""
    full = tokenize(answer_text(prompt))
    tokens = tuple(full[: max_tokens if max_tokens > 0 else DEFAULT_MAX_TOKENS])
    reason = "length" if len(full) > len(tokens) else "stop"
    usage = TokenUsage(count_tokens(system) + count_tokens(prompt), len(tokens))
    return LocalCompletion(tokens, reason, usage)


def _after(tokens: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """The tokens that follow `prefix` (text of this same answer another run streamed)."""
    text = ""
    for index, token in enumerate(tokens):
        if text == prefix:
            return tokens[index:]
        text += token
    return () if text == prefix else tokens


# Tokens already due go together (LocalProvider): every event costs the same on every layer
# whatever its size, and a delta per token was a fifth of llm_svc's CPU at zero delay. At
# most this many a delta, and the loop gets a turn before each, so a cancel is seen within a
# few tokens.
TOKENS_PER_DELTA = 8


class LocalProvider:
    """Streams `complete(...)` at one token every `token_delay_s` seconds, the way a
    provider's stream arrives: token n is due `n * token_delay_s` after the stream began,
    whatever the process was doing meanwhile. The tokens already due when the stream gets
    to one (all of them at zero delay, those a busy process is late for) come at once, in
    one delta of up to TOKENS_PER_DELTA, as they would from a full socket buffer, instead
    of each waiting its full delay after the last was read (which stretched a generation
    by every loop turn it waited). `sleep` and `clock` are the event loop's unless a test
    passes its own."""

    name = PROVIDER_NAME

    def __init__(
        self,
        token_delay_s: float = 0.03,
        *,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.token_delay_s = token_delay_s
        self._sleep = sleep
        self._clock = clock

    def estimate_tokens(self, request: ProviderRequest) -> int | None:
        return len(complete(request.prompt, request.max_tokens, request.system).tokens)

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        completion = complete(request.prompt, request.max_tokens, request.system)
        tokens = _after(completion.tokens, request.continue_from)
        loop = asyncio.get_running_loop()
        sleep = self._sleep or functools.partial(_sleep_on, loop)
        clock = self._clock or loop.time
        delay, started, sent = self.token_delay_s, clock(), 0
        while sent < len(tokens):
            await sleep(max(started + (sent + 1) * delay - clock(), 0.0))
            due = len(tokens) if delay <= 0 else int((clock() - started) / delay)
            count = min(max(due - sent, 1), TOKENS_PER_DELTA, len(tokens) - sent)
            yield TextDelta("".join(tokens[sent : sent + count]), tokens=count)
            sent += count
        yield Finish(completion.finish_reason, completion.usage)

    async def aclose(self) -> None:
        return None


async def _sleep_on(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    """`asyncio.sleep(seconds)` on a loop already at hand: asyncio.sleep looks the running
    loop up, a getpid() system call on Python 3.11, once per token of every stream."""
    if seconds <= 0:
        await asyncio.sleep(0)  # a bare yield: no lookup, no timer
        return
    woken = loop.create_future()
    timer = loop.call_later(seconds, _wake, woken)
    try:
        await woken
    finally:
        timer.cancel()


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
