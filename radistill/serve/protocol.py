"""The OpenAI request fields ``radistill serve`` takes, checked, and the response bodies it writes.

Completions (``POST /v1/completions``): ``prompt`` (a string or a list of strings: one batch), ``max_tokens``
(default 16, as OpenAI's), ``temperature`` (0: greedy; default 1), ``top_p``, ``stop`` (up to 4 strings, not part of
the returned text), ``seed``, ``stream``. Chat (``POST /v1/chat/completions``): ``messages`` (roles and text content,
rendered by the tokenizer's chat template), ``max_tokens`` / ``max_completion_tokens`` (default: up to the server's
limit), and the same sampling fields. A field this server cannot honour (``n`` > 1, ``logprobs``, penalties, tools,
...) is an error naming it rather than silently ignored; so is a field OpenAI does not define. Every error is an
OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

# Fields OpenAI defines that change nothing here when left at these values (clients often send them explicitly).
NEUTRAL = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False), "response_format": (None, {"type": "text"}),
}
IGNORED = {"user", "stream_options", "metadata", "store", "service_tier"}  # no effect on what is generated
MAX_STOP = 4


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, OpenAI error ``kind``, the offending field ``param``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Sampling:
    """How to generate: ``max_tokens`` None means up to the server's limit; ``temperature`` 0 is greedy."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"'{name}' must be a number in {bound}, got {value!r}", param=name)
    return float(value)


def _whole(body: dict, name: str, default: int | None, low: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(f"'{name}' must be an integer >= {low}, got {value!r}", param=name)
    return value


def _check_fields(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED:
            continue
        if name in NEUTRAL:
            if not any(value == neutral and type(value) is type(neutral) or value is neutral
                       for neutral in NEUTRAL[name]):
                raise RequestError(f"'{name}' = {value!r} is not supported by radistill serve (it generates one "
                                   "choice per prompt, without log-probabilities, penalties or tools)", param=name)
            continue
        raise RequestError(f"unknown field '{name}'", param=name)


def _sampling(body: dict, max_tokens: int | None) -> Sampling:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them",
                           param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", param="stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", param="seed")
    return Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), stop=stop, seed=seed,
                    stream=stream)


def _model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise RequestError(f"model '{model}' is not served here: this server serves '{served}'", status=404,
                           param="model", kind="not_found_error")


COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"}


def parse_completion(body: dict, served: str) -> tuple[list[str], Sampling]:
    """A completions request -> (prompts, sampling)."""
    _check_fields(body, COMMON | {"prompt"})
    _model(body, served)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError("'prompt' must be a non-empty string or a list of them (token ids are not taken)",
                           param="prompt")
    sampling = _sampling(body, _whole(body, "max_tokens", 16))
    if sampling.stream and len(prompts) > 1:
        raise RequestError("'stream' takes one prompt: send a list of prompts without it", param="stream")
    return prompts, sampling


def parse_chat(body: dict, served: str) -> tuple[list[dict], Sampling]:
    """A chat request -> (messages as {"role", "content": str}, sampling)."""
    _check_fields(body, COMMON | {"messages", "max_completion_tokens"})
    _model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}", param="messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are taken", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        plain.append({"role": message["role"], "content": content})
    limit = _whole(body, "max_completion_tokens", None)
    return plain, _sampling(body, _whole(body, "max_tokens", limit))


@dataclass
class Choice:
    """One generated answer: its text, why it ended ("stop" or "length") and its token count."""

    text: str
    finish_reason: str
    tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def completion_body(served: str, choices: list[Choice], prompt_tokens: int) -> dict:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": served,
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, choices)}


def chat_body(served: str, choice: Choice, prompt_tokens: int) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": served,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice.text},
                         "finish_reason": choice.finish_reason}],
            "usage": usage(prompt_tokens, [choice])}


def chunk(kind: str, ident: str, served: str, text: str | None, finish_reason: str | None,
          first: bool = False) -> dict:
    """One streamed event: ``kind`` "completion" or "chat"; ``text`` None with a ``finish_reason`` ends it."""
    created = int(time.time())
    if kind == "completion":
        return {"id": ident, "object": "text_completion", "created": created, "model": served,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}
    delta = {} if text is None else {"content": text}
    if first:
        delta = {"role": "assistant", **delta}
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": served,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


class StopTrimmer:
    """Streamed text cut before the first stop string: :meth:`feed` returns what can be sent now (never the start
    of a stop string that the next piece could complete), :meth:`finish` the rest; ``stopped`` once one is seen."""

    def __init__(self, stop: list[str]):
        self.stop, self.pending, self.stopped = stop, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            out, self.pending = self.pending[: min(found)], ""
            return out
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:n])),
                   default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def finish(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` before its first stop string, and whether one was found."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)
