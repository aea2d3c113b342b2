"""The model behind ``radistill serve``: :class:`Generator` runs ``model.generate()`` for the requests, concurrent
ones that generate alike as one batch, and :func:`make_server` puts it behind an HTTP server (``http.server``, one
thread per connection).

Which generate() call: greedy requests without stop strings pass ``cache_implementation="static"`` to a radistill
hybrid, so on CUDA they take its captured decode loop, streamed or not (docs/hybrid.md, "Generation and serving": the
fastest measured path); everything else (sampling, stop strings, any other model) calls generate() with
its defaults, so no request triggers a compile the user did not ask for. ``compile=True`` (``radistill serve
--compile``) passes the static cache to every request, so on CUDA transformers compiles the decode step of the rest
(its first request of each batch size waits for that compile). Prompts are left-padded into one batch (the hybrid's
recurrent heads take padding before a row's tokens only).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from radistill.serve import protocol
from radistill.serve.protocol import Choice, RequestError, Sampling
from radistill.utils.errors import RadistillError

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """One request waiting for the model: its prompts' token ids, its new-token budget and sampling; the worker
    fills ``choices`` or ``error`` and sets ``done``."""

    rows: list[list[int]]
    new_tokens: int
    sampling: Sampling
    done: threading.Event = field(default_factory=threading.Event)
    choices: list[Choice] | None = None
    error: Exception | None = None

    def key(self) -> tuple | None:
        """Jobs with equal keys can share one generate() call (None: none can, its seed fixes its own draws)."""
        s = self.sampling
        if s.seed is not None:
            return None
        return ("greedy", tuple(s.stop)) if s.greedy else ("sample", s.temperature, s.top_p, tuple(s.stop))


class Generator:
    """``model`` and ``tokenizer`` served as ``name``; ``max_tokens``: the most new tokens one request may ask for
    (and a chat request's default).

    Requests that generate alike (all greedy, or the same temperature and top-p; the same stop strings; no seed)
    and arrive within ``batch_wait`` seconds of the first share one generate() call, up to ``max_batch`` rows:
    a hybrid's decode step costs little more at batch 16 than at 1 (its recurrent state is constant), so concurrent
    clients are served together rather than in turn. Static batching: a batch runs until its longest request ends;
    a request's own rows are cut to its own ``max_tokens`` (greedy rows are what they would be alone: left padding
    changes no row, tested). A streamed request runs alone."""

    def __init__(self, model, tokenizer, name: str, max_tokens: int = 1024, max_batch: int = 16,
                 batch_wait: float = 0.01, compile: bool = False):
        self.model, self.tokenizer, self.name, self.max_tokens = model, tokenizer, name, max_tokens
        self.max_batch, self.batch_wait, self.compile = max_batch, batch_wait, compile
        self.lock = threading.Lock()  # one generate() at a time: the model, its caches and graphs are not shared
        self.created = int(time.time())
        self.context = getattr(model.config, "max_position_embeddings", None)
        config = model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.hybrid = hasattr(model.config, "kept_heads")  # a radistill student: its generate() has the graph loop
        self.device = next(model.parameters()).device
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start = threading.Lock()
        self.calls = 0  # generate() calls made (batches run): how many requests shared one shows in the log

    # ---- prompts --------------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"'{self.name}' has no chat template (its tokenizer defines none): use "
                               "/v1/completions with a plain prompt", param="messages")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own check of the roles / order
            raise RequestError(f"the chat template refused the messages: {exc}", param="messages") from exc

    def _prepare(self, prompts: list[str], sampling: Sampling, templated: bool) -> tuple[list[list[int]], int]:
        """-> (each prompt's token ids, the new-token budget), refusing what the model or server cannot take.
        ``templated``: the prompts come from the chat template, which writes its own special tokens."""
        rows = self.tokenizer(prompts, add_special_tokens=not templated)["input_ids"]
        longest = max(len(r) for r in rows)
        room = None if self.context is None else self.context - longest
        if room is not None and room < 1:
            raise RequestError(f"the prompt is {longest} tokens; '{self.name}' reads at most {self.context}",
                               param="prompt")
        wanted = self.max_tokens if sampling.max_tokens is None else sampling.max_tokens
        if wanted > self.max_tokens:
            raise RequestError(f"max_tokens {wanted} is more than this server allows ({self.max_tokens}; "
                               "`radistill serve --max-tokens`)", param="max_tokens")
        if room is not None and sampling.max_tokens is not None and wanted > room:
            raise RequestError(f"the prompt ({longest} tokens) and max_tokens ({wanted}) exceed the model's "
                               f"{self.context} tokens", param="max_tokens")
        return rows, min(wanted, room) if room is not None else wanted

    def _inputs(self, rows: list[list[int]]) -> dict:
        """Token rows -> generate's input_ids and attention_mask [rows, longest], left-padded, on the model's
        device (the hybrid's recurrent heads take padding before a row's tokens only)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _kwargs(self, inputs: dict, new_tokens: int, sampling: Sampling) -> dict:
        kwargs = dict(**inputs, max_new_tokens=new_tokens, pad_token_id=self.pad,
                      eos_token_id=sorted(self.eos) or None)
        if self.compile or (sampling.greedy and self.hybrid and not sampling.stop):
            # greedy, on a hybrid on CUDA: its captured decode loop (streamed too); otherwise (--compile)
            # transformers' loop with its compiled decode step on CUDA (a compile per new batch size); on the CPU the
            # static cache, eagerly
            kwargs["cache_implementation"] = "static"
        if sampling.greedy:
            kwargs["do_sample"] = False
        else:  # OpenAI's sampling: temperature and nucleus only (a model's own top-k would narrow it)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
        return kwargs

    def _choice(self, new: list[int], stop: list[str], new_tokens: int) -> Choice:
        """A row's new tokens (at most ``new_tokens``) -> its text (before the first end token or stop string) and
        finish reason."""
        ends = [i for i, t in enumerate(new) if t in self.eos]
        if not ends and self.pad not in self.eos:  # a row stopped by a stop string is padded after it
            ends = [i for i, t in enumerate(new) if t == self.pad]
        count = ends[0] + 1 if ends else len(new)
        text = self.tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True)
        text, cut = protocol.cut_at_stop(text, stop)
        finish = "stop" if ends or cut or count < new_tokens else "length"
        return Choice(text, finish, count)

    # ---- generation -----------------------------------------------------------------------------------------------

    def generate(self, prompts: list[str], sampling: Sampling, templated: bool = False) -> tuple[list[Choice], int]:
        """-> (one choice per prompt, prompt tokens in all); waits for the batch the request joins."""
        rows, new_tokens = self._prepare(prompts, sampling, templated)
        job = _Job(rows, new_tokens, sampling)
        with self._start:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve_jobs, name="radistill-serve-batches", daemon=True)
                self._worker.start()
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.choices, sum(len(r) for r in rows)

    def _serve_jobs(self) -> None:
        """The worker: take the next job, gather the compatible ones that arrive within ``batch_wait`` (a job that
        does not fit goes first next time), run them as one batch; forever."""
        held: _Job | None = None
        while True:
            job, held = held or self._jobs.get(), None
            batch, rows, key = [job], len(job.rows), job.key()
            deadline = time.monotonic() + self.batch_wait
            while key is not None and rows < self.max_batch:
                try:
                    other = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if other.key() != key or rows + len(other.rows) > self.max_batch:
                    held = other
                    break
                batch.append(other)
                rows += len(other.rows)
            self._run(batch)

    def _call(self, kwargs: dict, seed: int | None) -> torch.Tensor:
        """``model.generate(**kwargs)`` under inference mode, seeded when the request asks; the model's refusal of
        the input (a RadistillError) becomes the request's error. The caller holds ``lock``."""
        self.calls += 1
        with torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            try:
                return self.model.generate(**kwargs)
            except RadistillError as exc:
                raise RequestError(str(exc)) from exc

    def _run(self, batch: list[_Job]) -> None:
        sampling = batch[0].sampling
        new_tokens = max(job.new_tokens for job in batch)
        try:
            inputs = self._inputs([r for job in batch for r in job.rows])
            with self.lock:
                out = self._call(self._kwargs(inputs, new_tokens, sampling), sampling.seed).cpu()
            width, at = inputs["input_ids"].shape[1], 0
            for job in batch:
                job.choices = [self._choice(out[at + i, width: width + job.new_tokens].tolist(), job.sampling.stop,
                                            job.new_tokens) for i in range(len(job.rows))]
                at += len(job.rows)
        except Exception as exc:  # every job of the batch gets it; the worker goes on
            for job in batch:
                job.error = exc
        finally:
            for job in batch:
                job.done.set()

    def stream(self, prompt: str, sampling: Sampling,
               templated: bool = False) -> tuple[int, Iterator[tuple[str | None, str | None]]]:
        """-> (prompt tokens, events): (text, None) pieces as they are generated, then (None, finish reason).
        Closing the events early (a client that went away) stops generate() at its next token: the streamer raises
        there (a stopping criterion would do it too, but would send a student's greedy stream to transformers' loop
        instead of its captured one)."""
        rows, new_tokens = self._prepare([prompt], sampling, templated)
        inputs = self._inputs(rows)
        cancelled = threading.Event()
        streamer = _streamer(self.tokenizer, cancelled)
        kwargs = self._kwargs(inputs, new_tokens, sampling) | {"streamer": streamer}
        result: dict = {}

        def run() -> None:
            try:
                result["out"] = self._call(kwargs, sampling.seed)
            except BaseException as exc:  # reported after the stream: the thread must end the streamer
                result["error"] = exc
                streamer.end()

        def events() -> Iterator[tuple[str | None, str | None]]:
            with self.lock:
                worker = threading.Thread(target=run, name="radistill-serve-generate", daemon=True)
                worker.start()
                trimmer = protocol.StopTrimmer(sampling.stop)
                try:
                    for piece in streamer:
                        text = trimmer.feed(piece)
                        if text:
                            yield text, None
                finally:  # also when the consumer stops early: the lock is held until generate() has returned
                    cancelled.set()
                    worker.join()
            if "error" in result:
                raise result["error"]
            rest = trimmer.finish()
            if rest:
                yield rest, None
            width = inputs["input_ids"].shape[1]
            choice = self._choice(result["out"][0, width:].tolist(), sampling.stop, new_tokens)
            yield None, "stop" if trimmer.stopped else choice.finish_reason

        return len(rows[0]), events()


class _Cancelled(Exception):
    """Raised by a stream's streamer once its client has gone: generate() stops there."""


def _streamer(tokenizer, cancelled: threading.Event):
    """transformers' TextIteratorStreamer (new text as it decodes, the prompt skipped) that raises
    :class:`_Cancelled` on the next token once ``cancelled`` is set."""
    from transformers import TextIteratorStreamer

    class Streamer(TextIteratorStreamer):
        def put(self, value):
            if cancelled.is_set():
                raise _Cancelled
            super().put(value)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)


class Handler(BaseHTTPRequestHandler):
    """The OpenAI routes over the server's :class:`Generator` (``self.server.generator``)."""

    server_version = "radistill-serve"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: RequestError) -> None:
        self._send_json(error.status, error.body())

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        generator = self.server.generator
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": generator.name, "object": "model", "created": generator.created, "owned_by": "radistill"}]})
        elif self.path.rstrip("/") == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(RequestError(f"no route GET {self.path}", status=404, kind="not_found_error"))

    def do_POST(self) -> None:  # noqa: N802
        try:
            routes = {"/v1/completions": self._completion, "/v1/chat/completions": self._chat}
            route = routes.get(self.path.rstrip("/"))
            if route is None:
                raise RequestError(f"no route POST {self.path}", status=404, kind="not_found_error")
            route(self._body())
        except RequestError as error:
            self._error(error)
        except Exception as exc:  # a bug or a device error: the client gets a 500, the log the traceback
            logger.exception("request failed")
            self._error(RequestError(f"{type(exc).__name__}: {exc}", status=500, kind="server_error"))

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _completion(self, body: dict) -> None:
        generator = self.server.generator
        prompts, sampling = protocol.parse_completion(body, generator.name)
        if sampling.stream:
            self._stream("completion", *generator.stream(prompts[0], sampling))
            return
        choices, prompt_tokens = generator.generate(prompts, sampling)
        self._send_json(200, protocol.completion_body(generator.name, choices, prompt_tokens))

    def _chat(self, body: dict) -> None:
        generator = self.server.generator
        messages, sampling = protocol.parse_chat(body, generator.name)
        prompt = generator.chat_prompt(messages)
        if sampling.stream:
            self._stream("chat", *generator.stream(prompt, sampling, templated=True))
            return
        (choice,), prompt_tokens = generator.generate([prompt], sampling, templated=True)
        self._send_json(200, protocol.chat_body(generator.name, choice, prompt_tokens))

    def _stream(self, kind: str, prompt_tokens: int, events) -> None:
        """Server-sent events, one chunk per piece of text, a last one with the finish reason, then [DONE]. The
        first event is read before the headers go out, so a refused request still gets its error status."""
        name, ident = self.server.generator.name, protocol.new_id("chatcmpl" if kind == "chat" else "cmpl")
        events = iter(events)
        first = next(events)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(body: dict | str) -> None:
            data = body if isinstance(body, str) else json.dumps(body)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        if kind == "chat":
            send(protocol.chunk(kind, ident, name, "", None, first=True))
        try:
            send(protocol.chunk(kind, ident, name, *first))
            for text, finish in events:
                send(protocol.chunk(kind, ident, name, text, finish))
        except Exception as exc:  # the status is sent: the error goes down the stream, as OpenAI's does
            logger.exception("streamed request failed")
            error = exc if isinstance(exc, RequestError) else RequestError(f"{type(exc).__name__}: {exc}",
                                                                           status=500, kind="server_error")
            send(error.body())
        send("[DONE]")


def make_server(generator: Generator, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for ``generator`` (port 0: any free port; ``server.server_address`` says which). Run it with
    ``serve_forever()``; ``shutdown()`` stops it."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise RadistillError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.daemon_threads = True
    server.generator = generator
    return server


__all__ = ["Generator", "Handler", "make_server"]
