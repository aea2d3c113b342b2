"""``radistill serve``: the OpenAI routes over a small hybrid, against ``model.generate()`` called directly."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from test_build import VOCAB, byte_tokenizer
from test_hybrid import make_teacher
from test_window_mixer import MAMBA, window_student

from radistill.serve import Generator, RequestError, make_server
from radistill.serve.protocol import StopTrimmer, parse_chat, parse_completion

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def served():
    """A window_recurrent student of a tiny random teacher behind a server on a free port -> (url, generator)."""
    torch.manual_seed(0)
    teacher = make_teacher(vocab_size=VOCAB)
    student = window_student(teacher, [[0], [], [1], []], 4, mixer="window_recurrent",
                             settings={"window": 4, "sink": 2, **MAMBA})
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    generator = Generator(student, tokenizer, "tiny", max_tokens=64)
    server = make_server(generator, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", generator
    server.shutdown()
    server.server_close()


def call(url: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict | list]:
    """-> (status, the JSON body, or for a stream the list of its events' JSON, "[DONE]" last)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text, kind = response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    if kind == "text/event-stream":
        events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
        return status, [e if e == "[DONE]" else json.loads(e) for e in events]
    return status, json.loads(text)


def direct(generator: Generator, prompts: list[str], new: int, templated: bool = False) -> list[str]:
    """Greedy texts from model.generate() called directly (each prompt alone)."""
    texts = []
    for prompt in prompts:
        ids = generator.tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated).input_ids
        with torch.no_grad():
            out = generator.model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=generator.pad,
                                           eos_token_id=sorted(generator.eos) or None)
        row = out[0, ids.shape[1]:].tolist()
        ends = [i for i, t in enumerate(row) if t in generator.eos]
        texts.append(generator.tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True))
    return texts


def test_models_health_and_unknown_routes(served):
    url, _ = served
    assert call(url, "/v1/models") == (200, {"object": "list", "data": [
        {"id": "tiny", "object": "model", "created": served[1].created, "owned_by": "radistill"}]})
    assert call(url, "/health") == (200, {"status": "ok"})
    status, body = call(url, "/v1/embeddings", {"input": "x"})
    assert status == 404 and body["error"]["type"] == "not_found_error"


def test_greedy_completions_are_generate_and_a_list_is_one_left_padded_batch(served):
    url, generator = served
    prompts = ["The key is", "A much longer prompt about the values"]
    status, body = call(url, "/v1/completions", {"model": "tiny", "prompt": prompts, "max_tokens": 12,
                                                 "temperature": 0})
    assert status == 200 and body["object"] == "text_completion" and body["model"] == "tiny"
    assert [c["text"] for c in body["choices"]] == direct(generator, prompts, 12)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    prompt_tokens = sum(len(generator.tokenizer(p).input_ids) for p in prompts)
    usage = body["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    for choice in body["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
    if all(c["finish_reason"] == "length" for c in body["choices"]):
        assert usage["completion_tokens"] == 24


def test_stop_strings_are_cut_and_streaming_sends_the_same_text(served):
    url, generator = served
    (full,) = direct(generator, ["The key is"], 24)
    assert len(full) > 4
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    request = {"prompt": "The key is", "max_tokens": 24, "temperature": 0, "stop": [stop, "never seen"]}
    status, body = call(url, "/v1/completions", request)
    assert status == 200 and body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"
    status, events = call(url, "/v1/completions", {**request, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    status, events = call(url, "/v1/completions", {"prompt": "The key is", "max_tokens": 24, "temperature": 0,
                                                   "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full


def test_chat_renders_the_template_and_streams_a_role_first(served):
    url, generator = served
    messages = [{"role": "user", "content": "Where is the key?"}]
    prompt = generator.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    (expected,) = direct(generator, [prompt], 10, templated=True)
    status, body = call(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 10, "temperature": 0})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    parts = [{"role": "user", "content": [{"type": "text", "text": "Where is "}, {"type": "text", "text": "the key?"}]}]
    status, events = call(url, "/v1/chat/completions", {"messages": parts, "max_completion_tokens": 10,
                                                        "temperature": 0, "stream": True})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected
    assert events[-2]["object"] == "chat.completion.chunk" and events[-2]["choices"][0]["finish_reason"]


def test_sampling_follows_the_seed(served):
    url, _ = served
    request = {"prompt": "The key is", "max_tokens": 16, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first, second = call(url, "/v1/completions", request), call(url, "/v1/completions", request)
    other = call(url, "/v1/completions", {**request, "seed": 8})
    assert first[0] == 200 and first[1]["choices"] == second[1]["choices"]
    assert other[1]["choices"][0]["text"] != first[1]["choices"][0]["text"]


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"prompt": "x", "temprature": 0}, 400, "temprature"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": ["a", "b"], "stream": True}, 400, "stream"),
    ({"prompt": [1, 2, 3]}, 400, "prompt"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_get_an_openai_error(served, body, status, param):
    url, _ = served
    got, answer = call(url, "/v1/completions", body)
    assert got == status and answer["error"]["param"] == param and answer["error"]["message"]


def test_neutral_values_of_unsupported_fields_are_taken(served):
    url, _ = served
    status, _ = call(url, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 1, "logprobs": None,
                                              "presence_penalty": 0, "user": "me", "echo": False})
    assert status == 200


def test_context_and_chat_template_limits(served):
    _, generator = served
    small = Generator(generator.model, byte_tokenizer(), "tiny", max_tokens=64)
    small.context = 16
    with pytest.raises(RequestError, match="reads at most 16"):
        small.generate(["x" * 20], parse_completion({"prompt": "x"}, "tiny")[1])
    with pytest.raises(RequestError, match="exceed the model's 16 tokens"):
        small.generate(["x" * 10], parse_completion({"prompt": "x", "max_tokens": 8}, "tiny")[1])
    messages, _ = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, "tiny")
    with pytest.raises(RequestError, match="no chat template"):
        small.chat_prompt(messages)


def test_stop_trimmer_holds_back_what_could_start_a_stop_string():
    trimmer = StopTrimmer(["</s>", "##"])
    assert [trimmer.feed(p) for p in ["ab", "c<", "/", "x#", "y</s", ">tail"]] == ["ab", "c", "", "</x", "#y", ""]
    assert trimmer.stopped and trimmer.finish() == ""
    plain = StopTrimmer(["</s>"])
    assert plain.feed("a<") == "a" and plain.finish() == "<" and not plain.stopped


def test_cli_refuses_a_busy_port(tmp_path):
    from radistill.utils.errors import RadistillError

    first = make_server(None, port=0)
    try:
        with pytest.raises(RadistillError, match="cannot listen"):
            make_server(None, port=first.server_address[1])
    finally:
        first.server_close()


def test_a_stream_closed_early_stops_generate_and_frees_the_model(served):
    _, generator = served
    sampling = parse_completion({"prompt": "x", "max_tokens": 64, "temperature": 0, "stream": True}, "tiny")[1]
    _, events = generator.stream("The key is", sampling)
    next(events)
    events.close()  # what the handler's frame does when the client went away mid-stream
    assert generator.lock.acquire(blocking=False)
    generator.lock.release()
    assert not [t for t in threading.enumerate() if t.name == "radistill-serve-generate"]


def run_together(generator: Generator, requests: list[tuple[list[str], dict]]) -> list:
    """Each (prompts, fields) submitted from its own thread at once -> each one's choices (or its error)."""
    results = [None] * len(requests)

    def one(i, prompts, fields):
        try:
            results[i] = generator.generate(prompts, parse_completion({"prompt": prompts, **fields}, "tiny")[1])[0]
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_requests_that_generate_alike_share_one_generate_call(served):
    _, generator = served
    # a wait long enough for four threads on a loaded machine; the batch leaves as soon as it holds all four
    batched = Generator(generator.model, generator.tokenizer, "tiny", max_tokens=64, max_batch=4, batch_wait=5.0)
    prompts = ["The key is", "A much longer prompt about the values", "Short", "Another prompt"]
    lengths = [12, 5, 20, 8]
    results = run_together(batched, [([p], {"max_tokens": n, "temperature": 0}) for p, n in zip(prompts, lengths)])
    assert batched.calls == 1  # one batch of four rows, each cut to its own max_tokens
    for prompt, n, (choice,) in zip(prompts, lengths, results):
        assert choice.text == direct(generator, [prompt], n)[0]
        alone = Generator(generator.model, generator.tokenizer, "tiny", max_tokens=64, batch_wait=0.0)
        assert [choice] == alone.generate([prompt], parse_completion({"prompt": prompt, "max_tokens": n,
                                                                      "temperature": 0}, "tiny")[1])[0]


def test_requests_that_cannot_share_a_call_run_apart(served):
    _, generator = served
    batched = Generator(generator.model, generator.tokenizer, "tiny", max_tokens=64, max_batch=2, batch_wait=3.0)
    greedy = {"max_tokens": 4, "temperature": 0}
    results = run_together(batched, [(["a b"], greedy), (["c d"], greedy), (["e f"], greedy)])
    assert batched.calls == 2 and not any(isinstance(r, Exception) for r in results)  # max_batch rows per call
    batched.calls = 0
    seeded = {"max_tokens": 4, "temperature": 1.0, "seed": 3}
    results = run_together(batched, [(["a b"], seeded), (["a b"], seeded), (["a b"], {**greedy, "stop": ["x"]})])
    assert batched.calls == 3  # a seed fixes its own draws; other stop strings are another generate() call
    assert results[0][0].text == results[1][0].text  # same seed, same text, batched or not


def test_serve_benchmark_quick(tmp_path):
    """benchmarks/serve.py runs: concurrent clients share generate() calls and get the sequential texts."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "serve.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["same_texts"] and row["generate_calls"] == {"sequential": 4, "concurrent": 1}
    assert "| tiny-student |" in out.with_suffix(".md").read_text()


def test_compile_puts_every_request_on_the_static_cache_with_the_same_answers(served):
    """--compile: sampled and stopped requests pass the static cache too (on CUDA transformers compiles its step;
    here, on the CPU, it runs eagerly) and answer as without it; a greedy stream takes it either way."""
    _, generator = served
    compiled = Generator(generator.model, generator.tokenizer, "tiny", max_tokens=64, batch_wait=0.0, compile=True)
    seen = []
    original = generator.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return original(*args, **kwargs)

    generator.model.generate = spy
    try:
        for fields in ({"temperature": 0.9, "seed": 5}, {"temperature": 0, "stop": ["e"]}):
            sampling = parse_completion({"prompt": "The key", "max_tokens": 12, **fields}, "tiny")[1]
            assert compiled.generate(["The key"], sampling) == generator.generate(["The key"], sampling)
        sampling = parse_completion({"prompt": "x", "max_tokens": 12, "temperature": 0, "stream": True}, "tiny")[1]
        streams = ["".join(t or "" for t, _ in g.stream("The key", sampling)[1]) for g in (compiled, generator)]
        assert streams[0] == streams[1]
    finally:
        del generator.model.generate
    assert seen == ["static", None, "static", None, "static", "static"]  # a greedy stream: the student's loop
