"""The OpenAI-compatible server, driven by the official ``openai`` client over real HTTP on 127.0.0.1.

One server per module (two slots of the tiny CLI export, an API key), started in a thread; every
output is compared with what ``generate()`` gives on the same model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest
import torch

import tiny
from conftest import ROOT

pytest.importorskip("uvicorn")

from et_transformers.serving import create_app, load_slots, running  # noqa: E402
from et_transformers.serving.translation import PresenceFrequencyPenalty  # noqa: E402

KEY = "test-key"
MODEL = "tiny"
MAX_QUEUE = 14  # 16 clients over 2 slots: 14 wait


@pytest.fixture(scope="module")
def served(cli_model):
    """``(app, base URL)`` of the module's server: two slots of the tiny model."""
    models = load_slots(cli_model, 2)
    app = create_app(models, model_id=MODEL, api_key=KEY, max_queue=MAX_QUEUE, defaults={"max_new_tokens": 16})
    with running(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0)


def http(served) -> httpx.Client:
    return httpx.Client(base_url=served[1], headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def chat_ids(model, messages) -> list[int]:
    return list(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"])


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def text_of(model, tokens: list[int]) -> str:
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


def finish_of(model, tokens: list[int], n: int) -> str:
    eos = model.generation_config.eos_token_id
    return "stop" if tokens[-1] in (eos if isinstance(eos, list) else [eos]) or len(tokens) < n else "length"


# -- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_greedy_chat_equals_generate_token_for_token(client, cli_model, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of Spain?"}]
    ids = chat_ids(cli_model, messages)
    expected = greedy(cli_model, ids, 20)
    kwargs = dict(model=MODEL, messages=messages, max_tokens=20, temperature=0, logprobs=True)
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        tokens = [lp.token for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        reply = client.chat.completions.create(**kwargs)
        tokens = [lp.token for lp in reply.choices[0].logprobs.content]
        text, finish, usage = reply.choices[0].message.content, [reply.choices[0].finish_reason], reply.usage
    tok = cli_model.tokenizer
    assert tokens == [tok.decode([t]) for t in expected]
    assert text == text_of(cli_model, expected)
    assert finish == [finish_of(cli_model, expected, 20)]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(expected))
    assert usage.total_tokens == len(ids) + len(expected)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_greedy_completion_equals_generate(client, cli_model, stream):
    prompt = tiny.PROMPTS[1]
    ids = cli_model.tokenizer(prompt)["input_ids"]
    expected = greedy(cli_model, ids, 24)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=stream)
    text = "".join(c.choices[0].text for c in got if c.choices) if stream else got.choices[0].text
    assert text == text_of(cli_model, expected)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0)  # token ids
    assert by_ids.choices[0].text == text
    assert by_ids.choices[0].finish_reason == finish_of(cli_model, expected, 24)


def test_logprobs_and_top_logprobs_match_the_models_logits(client, cli_model):
    messages = [{"role": "user", "content": "Once upon a time"}]
    ids = chat_ids(cli_model, messages)
    out = cli_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             return_dict_in_generate=True, output_logits=True)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    tok = cli_model.tokenizer
    for step, entry in zip(out.logits, content):
        logprobs = torch.log_softmax(step[0].float(), dim=-1)
        best = torch.topk(logprobs, 3)
        assert entry.token == tok.decode([int(best.indices[0])])
        assert entry.logprob == pytest.approx(float(best.values[0]), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([int(i)]) for i in best.indices]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert bytes(entry.bytes).decode() == entry.token
    legacy = client.completions.create(model=MODEL, prompt=tiny.PROMPTS[0], max_tokens=4, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == 4
    assert all(len(top) == 2 for top in legacy.choices[0].logprobs.top_logprobs)


def test_stop_strings_seed_and_penalties(client, cli_model):
    prompt = tiny.PROMPTS[1]
    ids = cli_model.tokenizer(prompt)["input_ids"]
    full = text_of(cli_model, greedy(cli_model, ids, 24))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"

    sample = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.95)
    first, again = (client.completions.create(**sample, seed=7).choices[0].text for _ in range(2))
    others = {client.completions.create(**sample, seed=s).choices[0].text for s in (8, 9, 10)}
    assert first == again and others != {first}
    # no temperature: OpenAI's default, sampling at 1 (the server was started with no decoding default)
    omitted = {k: v for k, v in sample.items() if k != "temperature"}
    assert client.completions.create(**omitted, seed=7).choices[0].text == first

    penalized = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                          presence_penalty=1.5, frequency_penalty=0.5)
    processor = PresenceFrequencyPenalty(len(ids), 1.5, 0.5)
    expected = cli_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, logits_processor=[processor])
    assert penalized.choices[0].text == text_of(cli_model, expected[0, len(ids):].tolist())


def test_presence_and_frequency_penalties_follow_openai_semantics():
    scores = torch.zeros(1, 5)
    ids = torch.tensor([[3, 3, 1, 1, 1, 2]])  # prompt [3, 3]; completion 1 x3, 2 x1
    out = PresenceFrequencyPenalty(2, presence_penalty=0.5, frequency_penalty=0.25)(ids, scores)
    assert out[0].tolist() == [0.0, -(0.5 + 0.75), -(0.5 + 0.25), 0.0, 0.0]


# -- prompt cache, slots, queue ------------------------------------------------------------------


def test_second_chat_turn_reuses_the_first_turns_tokens(client, cli_model):
    first = [{"role": "user", "content": "Tell me about the weather today."}]
    reply = client.chat.completions.create(model=MODEL, messages=first, max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    history = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                       {"role": "user", "content": "And tomorrow?"}]
    second = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= reply.usage.prompt_tokens  # the whole first prompt, and the reply as far as it re-tokenizes
    assert second.usage.prompt_tokens - cached < second.usage.prompt_tokens // 2
    ids = chat_ids(cli_model, history)
    assert second.choices[0].message.content == text_of(cli_model, greedy(cli_model, ids, 8))


def test_sixteen_concurrent_streams_over_two_slots_each_get_their_solo_output(served, cli_model):
    prompts = [f"{tiny.PROMPTS[i % 3]} {'one two three'.split()[i % 3]}" for i in range(16)]
    lengths = [6 + (i * 5) % 19 for i in range(16)]
    expected = [text_of(cli_model, greedy(cli_model, cli_model.tokenizer(p)["input_ids"], n))
                for p, n in zip(prompts, lengths)]

    async def one(aclient, prompt, n):
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, p, n) for p, n in zip(prompts, lengths)))

    assert asyncio.run(all_of_them()) == expected
    pool = served[0].state.pool
    assert pool.busy == 0 and pool.queued == 0


def _slow_decode(program, seconds):
    decode = program.decode

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return decode(*args, **kwargs)

    return slow


def test_a_client_that_disconnects_frees_its_slot_for_a_queued_request_and_a_full_queue_gets_429(
    served, client, monkeypatch
):
    app, url = served
    pool = app.state.pool
    for slot in pool.slots:  # 30 ms per token, as a real model: generations outlast the test's steps
        monkeypatch.setattr(slot.model.program, "decode", _slow_decode(slot.model.program, 0.03))
    monkeypatch.setattr(pool, "max_queue", 1)
    long = dict(model=MODEL, max_tokens=100, temperature=0)
    prompts = ["The weather today is", "Questions and answers"]
    holders = [client.completions.create(**long, prompt=p, stream=True) for p in prompts]
    for h in holders:
        next(iter(h))  # both slots are generating
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(
        reply=client.completions.create(model=MODEL, prompt="one two", max_tokens=3, temperature=0),
        done=time.monotonic()))
    waiter.start()
    with http(served) as h:
        deadline = time.monotonic() + 10
        while h.get("/health").json()["queue"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.get("/health").json() | {"model": None} == {
            "status": "ok", "model": None, "slots": 2, "slots_busy": 2, "queue": 1, "max_queue": 1, "context": 128}
        full = h.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    assert full.json()["error"]["code"] == "queue_full" and "--max-queue" in full.json()["error"]["message"]

    closed = time.monotonic()
    holders[0].close()  # the client disconnects mid-stream
    waiter.join(20)
    assert queued["done"] - closed < 2.0  # started on the freed slot, not after the 100 tokens (3 s)
    assert queued["reply"].choices[0].text
    # The disconnected generation stopped early: its slot's cache holds what it generated.
    lengths = sorted(len(s.cache.tokens) for s in pool.slots)
    assert lengths[0] < 40
    holders[1].close()


# -- errors --------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("malformed JSON", "/v1/chat/completions", '{"model": "tiny", "messages": [', 400, None, "parse the JSON"),
    ("wrong type", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": "many"}, 422, "max_tokens", "integer"),
    ("out of range", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 5}, 422, "temperature", "2"),
    ("unknown field", "/v1/completions", {"model": MODEL, "prompt": "hi", "bogus": 1}, 400, "bogus", "Unrecognized"),
    ("n > 1", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2},
     400, "n", "n=2 is not supported"),
    ("tool with a bad name", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
     "tools": [{"type": "function", "function": {"name": "no spaces"}}], "tool_choice": "required"}, 400,
     "tools", "1-64 letters"),
    ("tool_choice without tools", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
     "tool_choice": "required"}, 400, "tool_choice", "needs tools"),
    ("unknown response_format type", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
     "content": "hi"}], "response_format": {"type": "xml"}}, 400, "response_format", "type 'xml' is not valid"),
    ("invalid JSON schema", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
     "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
     "properties": {"n": {"minimum": "low"}}}}}}, 400, "response_format", "properties/n/minimum"),
    ("JSON the vocabulary cannot spell", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
     "content": "hi"}], "response_format": {"type": "json_object"}}, 400, "response_format", "cannot spell '{'"),
    ("prompt beyond context", "/v1/completions", {"model": MODEL, "prompt": list(range(3, 203))}, 400, "prompt",
     "maximum context length is 128"),
    ("max_tokens beyond context", "/v1/completions", {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 500}, 400,
     "max_tokens", "at most 125 new tokens"),
    ("token id outside vocabulary", "/v1/completions", {"model": MODEL, "prompt": [5, 100000]}, 400, "prompt",
     "vocabulary"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
     404, "model", "'gpt-9' does not exist"),
    ("top_p when greedy", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 0, "top_p": 0.5},
     400, "top_p", "applies to sampling"),
    ("stream_options without stream", "/v1/completions", {"model": MODEL, "prompt": "hi",
                                                           "stream_options": {"include_usage": True}},
     400, "stream_options", "stream=true"),
    ("unknown route", "/v1/embeddings", {"model": MODEL, "input": "hi"}, 404, None, "No route"),
]


@pytest.mark.parametrize("body", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_error_bodies_and_the_server_lives_on(served, body):
    route, payload, status, param, message = body
    with http(served) as h:
        if isinstance(payload, str):
            r = h.post(route, content=payload, headers={"Content-Type": "application/json"})
        else:
            r = h.post(route, json=payload)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and message in error["message"], error
        assert h.get("/health").status_code == 200


def test_api_key_is_required_on_v1_routes(served):
    with httpx.Client(base_url=served[1]) as h:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = h.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert h.get("/health").status_code == 200  # liveness needs no key
    bad = openai.OpenAI(base_url=served[1] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_models_health_and_prometheus_metrics(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with http(served) as h:
        health = h.get("/health").json()
        metrics = h.get("/metrics")
    assert health["status"] == "ok" and health["slots"] == 2
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("et_requests_total", "et_prompt_tokens_total", "et_prompt_cached_tokens_total",
                 "et_generated_tokens_total", "et_time_to_first_token_seconds_bucket",
                 "et_decode_tokens_per_second_bucket", "et_queue_depth", "et_slots_busy"):
        assert name in text, name
    assert 'et_requests_total{route="/v1/models",status="200"}' in text


def test_cli_serve_starts_on_loopback_and_answers(cli_export):
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "et_transformers.cli", "serve", str(cli_export[0]),
                             "--port", str(port), "--slots", "2", "--max-new-tokens", "5"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        reply = c.chat.completions.create(model=str(cli_export[0]), messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens <= 5
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"Serving {cli_export[0]} on http://127.0.0.1:{port}/v1 (2 slot(s)" in err
