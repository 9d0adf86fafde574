"""The openai backend's tokens-per-minute limit: the bucket on an injected clock, and the session
that charges each request before sending it and corrects the charge by the usage answered."""

import asyncio
import json

import pytest
from openai_server import FakeOpenAI

from selma.llm.ratelimit import TokenBucket, TokenLimitedSession, TokenLimitedSessions, expected_tokens, used_tokens


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_lets_a_minutes_tokens_through_then_paces_at_the_rate():
    clock = Clock()
    bucket = TokenBucket(600, clock=clock)  # 10 tokens a second
    assert bucket.reserve(400) == 0
    assert bucket.reserve(200) == 0  # a minute's worth spent
    assert bucket.reserve(50) == pytest.approx(5.0)  # 50 tokens owed at 10 a second
    assert bucket.reserve(50) == pytest.approx(10.0)  # queued behind the first
    clock.now += 10  # both waited their turn; the bucket is empty again
    assert bucket.reserve(10) == pytest.approx(1.0)
    clock.now += 3600  # refills to a minute's worth, never more
    assert bucket.reserve(600) == 0
    assert bucket.reserve(1) == pytest.approx(0.1)


def test_a_request_larger_than_the_budget_still_goes_after_the_bucket_refills():
    clock = Clock()
    bucket = TokenBucket(60, clock=clock)  # 1 token a second
    assert bucket.reserve(150) == 0  # a full bucket lets it go, owing 90
    assert bucket.reserve(1) == pytest.approx(91.0)


def test_settling_refunds_an_overestimate_and_charges_an_underestimate():
    clock = Clock()
    bucket = TokenBucket(600, clock=clock)
    assert bucket.reserve(600) == 0
    bucket.settle(charged=600, used=100)  # the answer used far less than max_tokens allowed
    assert bucket.reserve(500) == 0
    assert bucket.reserve(10) == pytest.approx(1.0)
    fresh = TokenBucket(600, clock=clock)
    fresh.reserve(100)
    fresh.settle(charged=100, used=700)  # more than estimated: the debt delays the next request
    assert fresh.reserve(0) == pytest.approx(10.0)
    fresh.settle(charged=0, used=0)
    assert fresh.level <= fresh.capacity


def test_a_request_is_expected_to_use_its_prompt_estimate_plus_max_tokens():
    assert expected_tokens({"prompt": "x" * 40, "max_tokens": 100}) == 110
    assert expected_tokens({"prompt": "x" * 41, "max_tokens": 100}) == 111
    chat = {"messages": [{"role": "user", "content": "y" * 8}], "max_tokens": 10}
    assert expected_tokens(chat) == 2 + 4 + 10
    assert used_tokens({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == 7
    assert used_tokens({"usage": {"total_tokens": 9, "prompt_tokens": 3}}) == 9
    assert used_tokens({"choices": []}) is None


def test_the_session_charges_before_sending_and_settles_by_the_answered_usage():
    clock = Clock()
    bucket = TokenBucket(1_000_000, clock=clock)
    payload = {"model": "m", "prompt": "Write more.\n1. A red kite above a beach.\n2.", "max_tokens": 500, "seed": 1}

    async def post_once(url: str):
        async with TokenLimitedSession(bucket) as session:
            async with await session.post(url, data=json.dumps(payload)) as response:
                return response.status, await response.json()

    with FakeOpenAI(candidates=3) as server:
        status, answer = asyncio.run(post_once(f"{server.base_url}/completions"))
    assert status == 200 and answer["choices"][0]["text"]  # the stage still reads the body
    used = server.usages[0]["total_tokens"]
    assert used == answer["usage"]["total_tokens"] and used < expected_tokens(payload)
    assert bucket.level == pytest.approx(bucket.capacity - used)


def test_an_error_answer_refunds_its_charge():
    clock = Clock()
    bucket = TokenBucket(60_000, clock=clock)

    async def post_once(url: str) -> int:
        async with TokenLimitedSession(bucket) as session:
            async with await session.post(url, data=json.dumps({"prompt": "p", "max_tokens": 5000})) as response:
                return response.status

    with FakeOpenAI(unavailable_first=1) as server:
        assert asyncio.run(post_once(f"{server.base_url}/completions")) == 503
    assert bucket.level == pytest.approx(bucket.capacity)


def test_each_worker_builds_its_own_bucket_on_first_use():
    import pickle

    factory = TokenLimitedSessions(1200)
    copy = pickle.loads(pickle.dumps(factory))
    assert copy.bucket is None and copy.tokens_per_minute == 1200

    async def two_sessions() -> bool:
        first, second = copy(), copy()
        await first.session.close(), await second.session.close()
        return first.bucket is second.bucket is copy.bucket and copy.bucket.capacity == 1200

    assert asyncio.run(two_sessions())
