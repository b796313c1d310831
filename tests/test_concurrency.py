"""One model object, many threads: calls are serialized, so every output is the single-threaded one."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import tiny

THREADS, CALLS = 8, 5


@pytest.fixture()
def fast_switching():
    """Switch threads every microsecond, to provoke interleaving inside a generation."""
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(saved)


def jobs():
    """``THREADS * CALLS`` mixed calls: prompts of several lengths, several lengths of reply, streams."""
    tok = tiny.make_tokenizer()
    prompts = [tok(p, return_tensors="pt").input_ids for p in tiny.PROMPTS] + [torch.tensor([[5, 9, 100, 33]])]
    return [
        (prompts[i % len(prompts)], 4 + (i * 7) % 17, i % 3 == 0)  # (ids, max_new_tokens, stream)
        for i in range(THREADS * CALLS)
    ]


def run(model, ids, max_new_tokens, streamed):
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    if streamed:
        return [r.token for r in model.stream_generate(ids, **kwargs)]
    return model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()


def test_eight_threads_on_one_model_get_the_single_threaded_outputs(et, fast_switching):
    work = jobs()
    expected = [run(et, *job) for job in work]
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(lambda chunk: [run(et, *job) for job in chunk], work[t::THREADS])
                   for t in range(THREADS)]
        got = [f.result() for f in futures]
    for t, outputs in enumerate(got):
        assert outputs == expected[t::THREADS], f"thread {t} got another call's tokens"


def test_a_stream_finished_on_another_thread_frees_the_model(et):
    stream = et.stream_generate(torch.tensor([[5, 9]]), max_new_tokens=6, eos_token_id=None)
    first = next(stream)  # the stream now holds the model
    rest = []
    worker = threading.Thread(target=lambda: rest.extend(stream))  # a thread pool moves streams so
    worker.start()
    worker.join()
    expected = et.generate(torch.tensor([[5, 9]]), max_new_tokens=6, eos_token_id=None)[0, 2:].tolist()
    assert [first.token] + [r.token for r in rest] == expected  # and generate() did not wait forever


def test_an_abandoned_stream_releases_the_model_when_collected(et):
    stream = et.stream_generate(torch.tensor([[5, 9]]), max_new_tokens=6, eos_token_id=None)
    next(stream)
    del stream  # garbage collected: its finally gives the lock back
    done = threading.Event()
    worker = threading.Thread(target=lambda: (et.generate(torch.tensor([[5, 9]]), max_new_tokens=2), done.set()))
    worker.start()
    worker.join(timeout=60)
    assert done.is_set()


def test_a_stream_resumed_on_another_thread_keeps_the_model_from_the_thread_that_started_it(et):
    """A web server's pool may start a stream on one worker and resume it on another; the first
    worker's next call must wait for the stream, not run beside it (it owned the hold once)."""
    prompt, other_prompt = torch.tensor([[5, 9, 11]]), torch.tensor([[7, 8]])
    expected = [r.token for r in et.stream_generate(prompt, max_new_tokens=8, eos_token_id=None)]
    other = et.generate(other_prompt, max_new_tokens=3, do_sample=False)
    shared, got, done = {}, [], {}
    started, resumed = threading.Event(), threading.Event()

    def first_worker():
        shared["stream"] = et.stream_generate(prompt, max_new_tokens=8, eos_token_id=None)
        got.append(next(shared["stream"]).token)
        started.set()
        resumed.wait(30)
        done["out"] = et.generate(other_prompt, max_new_tokens=3, do_sample=False)

    a = threading.Thread(target=first_worker)
    a.start()
    assert started.wait(30)
    b = threading.Thread(target=lambda: got.append(next(shared["stream"]).token))
    b.start()
    b.join(30)
    resumed.set()
    a.join(timeout=1.0)
    assert a.is_alive(), "the first worker ran the model while the stream it started was open"
    got.extend(r.token for r in shared["stream"])  # resumed on this thread, to the end
    a.join(60)
    assert got == expected
    assert torch.equal(done["out"], other)
