"""A small local server speaking the OpenAI completions and chat-completions protocol.

It stands in for a paid endpoint in tests: answers continue the numbered list of the request
with phrases from selma's template generator (seeded by the request's ``seed``), each with a
``usage`` (words of the prompt and of the answer, recorded in ``usages``), and it can be made
slow, flaky (503s), or refuse every request (401 with an OpenAI-shaped error).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from selma.llm.base import LLMRequest
from selma.llm.template import TemplateBackend
from selma.skills import load_registry

LAST_NUMBER = re.compile(r"(\d+)\.\s*$")
LIST_FROM = re.compile(r"numbered list from (\d+) to")  # a chat request (selma.skills.Skill.render_instruction)


class FakeOpenAI:
    def __init__(self, *, delay_s: float = 0.0, unavailable_first: int = 0, api_key: str | None = None,
                 candidates: int = 5, respond=None, hold_after: int | None = None, hold_until=None,
                 hold_timeout_s: float = 120.0):
        """``respond(prompt) -> text`` replaces the template phrases (e.g. to answer DSG's calls).

        ``hold_after=N, hold_until=condition`` answers the first N requests, then holds every later
        one until ``condition()`` is true (or ``hold_timeout_s`` passed); ``released_by`` records
        which of the two let them go ("condition" or "timeout").
        """
        self.delay_s, self.unavailable_left, self.api_key = delay_s, unavailable_first, api_key
        self.hold_after, self.hold_until, self.hold_timeout_s = hold_after, hold_until, hold_timeout_s
        self.released_by: str | None = None
        self.respond = respond
        self.candidates = candidates
        self.requests: list[dict] = []
        self.usages: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.template = TemplateBackend(load_registry())
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = server.answer(self.path, dict(self.headers), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _wait_for_release(self) -> None:
        deadline = time.monotonic() + self.hold_timeout_s
        while self.released_by is None:
            if self.hold_until():
                self.released_by = "condition"
            elif time.monotonic() > deadline:
                self.released_by = "timeout"
            else:
                time.sleep(0.1)

    def answer(self, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        with self.lock:
            self.headers.append(headers)
            if self.unavailable_left > 0:
                self.unavailable_left -= 1
                return 503, {"error": {"message": "overloaded", "type": "server_error"}}
        if self.api_key and headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
        try:
            payload = json.loads(body)
        except ValueError:
            return 400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}}
        with self.lock:
            self.requests.append(payload)
            held = self.hold_after is not None and len(self.requests) > self.hold_after
        if held:
            self._wait_for_release()
        time.sleep(self.delay_s)
        chat = path.endswith("/chat/completions")
        prompt = payload["messages"][-1]["content"] if chat else payload["prompt"]
        match = LAST_NUMBER.search(prompt) or LIST_FROM.search(prompt)
        first_index = int(match.group(1)) if match else 1
        if self.respond is not None:
            text = self.respond(prompt)
        else:
            text = self.template.generate([LLMRequest(skill="coco", prompt=prompt, seed=int(payload.get("seed", 0)),
                                                      num_candidates=self.candidates, first_index=first_index)])[0]
        if chat and self.respond is not None:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        elif chat:
            lines = text.strip().split("\n")
            text = "Here are more descriptions:\n" + "\n".join([f"{first_index}. {lines[0]}", *lines[1:]])
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
        answered = choice["message"]["content"] if chat else choice["text"]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(answered.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with self.lock:
            self.usages.append(usage)
        return 200, {"id": f"cmpl-{random.getrandbits(32)}", "object": "chat.completion" if chat else "text_completion",
                     "model": payload.get("model"), "choices": [choice], "usage": usage}
