"""The model behind ``radistill serve``: :class:`Generator` runs ``model.generate()`` for one request at a time, and
:func:`make_server` puts it behind an HTTP server (``http.server``, one thread per connection).

Which generate() call: greedy requests without streaming or stop strings pass ``cache_implementation="static"`` to
a radistill hybrid, so on CUDA they take its captured decode loop (docs/hybrid.md, "Generation and serving": the
fastest measured path); everything else (sampling, streaming, stop strings, any other model) calls generate() with
its defaults, so no request triggers a compile the user did not ask for. Prompts are left-padded into one batch
(the hybrid's recurrent heads take padding before a row's tokens only).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from radistill.serve import protocol
from radistill.serve.protocol import Choice, RequestError, Sampling
from radistill.utils.errors import RadistillError

logger = logging.getLogger(__name__)


class Generator:
    """``model`` and ``tokenizer`` served as ``name``; ``max_tokens``: the most new tokens one request may ask for
    (and a chat request's default)."""

    def __init__(self, model, tokenizer, name: str, max_tokens: int = 1024):
        self.model, self.tokenizer, self.name, self.max_tokens = model, tokenizer, name, max_tokens
        self.lock = threading.Lock()  # one generate() at a time: the model, its caches and graphs are not shared
        self.created = int(time.time())
        self.context = getattr(model.config, "max_position_embeddings", None)
        config = model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.hybrid = hasattr(model.config, "kept_heads")  # a radistill student: its generate() has the graph loop

    # ---- prompts --------------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"'{self.name}' has no chat template (its tokenizer defines none): use "
                               "/v1/completions with a plain prompt", param="messages")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template's own check of the roles / order
            raise RequestError(f"the chat template refused the messages: {exc}", param="messages") from exc

    def _encode(self, prompts: list[str], sampling: Sampling, templated: bool) -> tuple[dict, int]:
        """-> (generate's inputs, left-padded, on the model's device; the new-token budget). ``templated``: the
        prompts come from the chat template, which writes its own special tokens."""
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                               add_special_tokens=not templated)
        length = batch["input_ids"].shape[1]
        room = None if self.context is None else self.context - length
        if room is not None and room < 1:
            raise RequestError(f"the prompt is {length} tokens; '{self.name}' reads at most {self.context}",
                               param="prompt")
        wanted = self.max_tokens if sampling.max_tokens is None else sampling.max_tokens
        if wanted > self.max_tokens:
            raise RequestError(f"max_tokens {wanted} is more than this server allows ({self.max_tokens}; "
                               "`radistill serve --max-tokens`)", param="max_tokens")
        if room is not None and sampling.max_tokens is not None and wanted > room:
            raise RequestError(f"the prompt ({length} tokens) and max_tokens ({wanted}) exceed the model's "
                               f"{self.context} tokens", param="max_tokens")
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}, min(wanted, room) if room is not None else wanted

    def _kwargs(self, inputs: dict, new_tokens: int, sampling: Sampling, streaming: bool) -> dict:
        kwargs = dict(**inputs, max_new_tokens=new_tokens, pad_token_id=self.pad,
                      eos_token_id=sorted(self.eos) or None)
        if sampling.greedy:
            kwargs["do_sample"] = False
            if self.hybrid and not streaming and not sampling.stop:
                kwargs["cache_implementation"] = "static"  # the captured decode loop on CUDA
        else:  # OpenAI's sampling: temperature and nucleus only (a model's own top-k would narrow it)
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
        return kwargs

    def _choice(self, new: list[int], stop: list[str], new_tokens: int) -> Choice:
        """A row's new tokens -> its text (before the first end token or stop string) and finish reason."""
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
        """-> (one choice per prompt, prompt tokens in all)."""
        inputs, new_tokens = self._encode(prompts, sampling, templated)
        prompt_tokens = int(inputs["attention_mask"].sum())
        with self.lock, torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            try:
                out = self.model.generate(**self._kwargs(inputs, new_tokens, sampling, streaming=False))
            except RadistillError as exc:
                raise RequestError(str(exc)) from exc
        width = inputs["input_ids"].shape[1]
        return [self._choice(row[width:].tolist(), sampling.stop, new_tokens) for row in out.cpu()], prompt_tokens

    def stream(self, prompt: str, sampling: Sampling,
               templated: bool = False) -> tuple[int, Iterator[tuple[str | None, str | None]]]:
        """-> (prompt tokens, events): (text, None) pieces as they are generated, then (None, finish reason).
        Closing the events early (a client that went away) stops generate() at its next step."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        inputs, new_tokens = self._encode([prompt], sampling, templated)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        cancelled = threading.Event()
        kwargs = self._kwargs(inputs, new_tokens, sampling, streaming=True) | {
            "streamer": streamer, "stopping_criteria": StoppingCriteriaList([_Cancelled(cancelled)])}
        result: dict = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                    result["out"] = self.model.generate(**kwargs)
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
            error = result.get("error")
            if isinstance(error, RadistillError):  # the model refused the input
                raise RequestError(str(error)) from error
            if error is not None:
                raise error
            rest = trimmer.finish()
            if rest:
                yield rest, None
            width = inputs["input_ids"].shape[1]
            choice = self._choice(result["out"][0, width:].tolist(), sampling.stop, new_tokens)
            yield None, "stop" if trimmer.stopped else choice.finish_reason

        return int(inputs["attention_mask"].sum()), events()


class _Cancelled:
    """A stopping criterion that ends every row once ``event`` is set (a streaming client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
