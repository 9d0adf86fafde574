"""A tokens-per-minute limit for the ``openai`` backend (``prompts.openai.tpm``), beside ``qps``.

``ray.data.llm``'s HTTP stage paces requests per second only; it takes a ``session_factory``, and
:class:`TokenLimitedSessions` hands it aiohttp sessions whose ``post`` first charges the request's
expected tokens (a prompt estimate plus ``max_tokens``) to a :class:`TokenBucket` shared by every
request of the worker, waits as long as the bucket says, and once the answer is in corrects the
charge by the ``usage`` it reports (an error answer used none).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Callable

# aiohttp is imported where used: it comes with ray.data.llm, which the driver need not load.

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of a chat message


class TokenBucket:
    """``tokens_per_minute`` tokens, refilled continuously, at most a minute's worth banked.

    :meth:`reserve` charges a request at once and says how long to wait before sending it: until
    the bucket would hold its tokens (a request larger than a minute's budget: until the bucket is
    full). The level may go below zero; later requests wait until it has refilled. ``clock``
    (seconds) is injectable.
    """

    def __init__(self, tokens_per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.capacity = float(tokens_per_minute)
        self.rate = tokens_per_minute / 60.0
        self.clock = clock
        self.level = self.capacity
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def reserve(self, tokens: int) -> float:
        """Charge ``tokens``; the seconds to wait before sending the request."""
        self._refill()
        wait = max(0.0, (min(tokens, self.capacity) - self.level) / self.rate)
        self.level -= tokens
        return wait

    def settle(self, charged: int, used: int) -> None:
        """Correct a reservation of ``charged`` tokens by the ``used`` tokens the answer reported."""
        self._refill()
        self.level = min(self.capacity, self.level + charged - used)


def expected_tokens(payload: dict) -> int:
    """What a completions or chat request may use: its prompt, estimated from its characters,
    plus the ``max_tokens`` it allows."""
    if "messages" in payload:
        prompt = sum(math.ceil(len(str(m.get("content") or "")) / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS
                     for m in payload["messages"])
    else:
        prompt = math.ceil(len(str(payload.get("prompt") or "")) / CHARS_PER_TOKEN)
    return prompt + int(payload.get("max_tokens") or 0)


def used_tokens(answer) -> int | None:
    """The tokens an OpenAI-style answer reports in ``usage``; None when it reports none."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None
    if isinstance(usage.get("total_tokens"), int):
        return usage["total_tokens"]
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    return sum(parts) if all(isinstance(p, int) for p in parts) else None


class TokenLimitedSession:
    """The part of ``aiohttp.ClientSession`` the HTTP stage uses, with ``post`` paced by a bucket."""

    def __init__(self, bucket: TokenBucket):
        import aiohttp

        self.bucket = bucket
        self.session = aiohttp.ClientSession()

    async def __aenter__(self) -> "TokenLimitedSession":
        await self.session.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.__aexit__(*exc)

    def post(self, url: str, *, data=None, **kwargs):
        return self._post(url, data, kwargs)

    async def _post(self, url: str, data, kwargs):
        try:
            charged = expected_tokens(json.loads(data))
        except (TypeError, ValueError):  # not a JSON body: nothing to charge
            charged = 0
        wait = self.bucket.reserve(charged)
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            response = await self.session.post(url, data=data, **kwargs)
        except BaseException:
            self.bucket.settle(charged, 0)
            raise
        used = 0 if response.status >= 400 else charged
        if response.status < 400:
            try:  # aiohttp keeps the body: the stage reads it again
                reported = used_tokens(await response.json(content_type=None))
            except ValueError:
                reported = None
            used = charged if reported is None else reported
        self.bucket.settle(charged, used)
        return response


class TokenLimitedSessions:
    """The HTTP stage's ``session_factory``: sessions sharing one bucket per worker (each worker
    unpickles its own factory; the bucket starts there, on first use)."""

    def __init__(self, tokens_per_minute: int):
        self.tokens_per_minute = tokens_per_minute
        self.bucket: TokenBucket | None = None

    def __call__(self) -> TokenLimitedSession:
        if self.bucket is None:
            self.bucket = TokenBucket(self.tokens_per_minute)
        return TokenLimitedSession(self.bucket)
