"""`dsmoe serve` end to end on CPU: a real server process on a free loopback port over a small checkpoint
(random micro-preset weights + the task tokenizer), driven by the official `openai` client and httpx.
Greedy and seeded results are checked against an in-process `LLM.generate` on the same checkpoint."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prom_parser = pytest.importorskip("prometheus_client.parser")

import dsmoe  # noqa: E402
from dsmoe.data import PermutedCopyTask  # noqa: E402
from dsmoe.models import DeepseekV3ForCausalLM  # noqa: E402
from dsmoe.serve import LLM, SamplingParams  # noqa: E402
from dsmoe.tokenizer import save_task_tokenizer  # noqa: E402
from dsmoe.train import PRESETS, preset_config  # noqa: E402

NAME = "micro-test"
MAX_LEN = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    task = PermutedCopyTask(**PRESETS["micro"]["task"])
    cfg = preset_config("micro", task.vocab_size)
    cfg.max_position_embeddings = MAX_LEN     # room for prompts longer than one 64-token cache block
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "checkpoint")
    DeepseekV3ForCausalLM(cfg, fp8=False).save_pretrained(path)
    save_task_tokenizer(task, path)
    return path


@pytest.fixture(scope="module")
def llm(ckpt):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    # the server speculates with MTP: greedy outputs are the same either way, seeded samples only when
    # the reference speculates the same way (the drafts draw from the request's generator)
    yield LLM(ckpt, device="cpu", speculative="mtp")
    torch.set_num_threads(n)


def _start(ckpt, log, *extra):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(dsmoe.__file__)), OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dsmoe", "serve", ckpt, "--port", str(port),
                                 "--served-model-name", NAME, "--device", "cpu", *extra],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, f"dsmoe serve exited early:\n{log.read_text()}"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"dsmoe serve did not come up:\n{log.read_text()}"
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _stop(proc, log, sig):
    """Sends ``sig`` and checks a clean exit (uvicorn finishes its shutdown, then re-raises the signal it
    caught, as processes conventionally report one)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"dsmoe serve did not stop on {sig!r}:\n{log.read_text()}")
    text = log.read_text()
    assert proc.returncode in (0, -sig), text
    assert "Application shutdown complete" in text and "Finished server process" in text, text
    assert "Traceback" not in text, text
    return text


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc, base = _start(ckpt, log, "--speculative", "mtp")
    try:
        yield base
    finally:
        text = _stop(proc, log, signal.SIGTERM)
    assert "POST /v1/completions 200" in text       # one log line per request


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def _text_prompt(n, g):
    return "<s> " + " ".join(str(int(x)) for x in torch.randint(0, 8, (n,), generator=g))


def _check_usage(u, prompt_len, completion_len):
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (prompt_len, completion_len,
                                                                      prompt_len + completion_len)
    extra = u.model_extra if hasattr(u, "model_extra") else u
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == prompt_len
    return extra["prompt_cache_hit_tokens"]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def test_greedy_completions_equal_llm_generate(client, llm):
    g = torch.Generator().manual_seed(1)
    texts = [_text_prompt(n, g) for n in (3, 11, 30)]
    ids = torch.randint(2, 11, (17,), generator=g).tolist()
    sp = SamplingParams(max_tokens=9, temperature=0)
    want = llm.generate(texts + [ids], sp)
    assert sum(len(w.outputs[0].text) for w in want) > 10, "the check needs completions with text"
    # one string
    r = client.completions.create(model=NAME, prompt=texts[0], max_tokens=9, temperature=0)
    assert r.choices[0].text == want[0].outputs[0].text
    assert r.choices[0].finish_reason == want[0].outputs[0].finish_reason
    _check_usage(r.usage, len(want[0].prompt_token_ids), len(want[0].outputs[0].token_ids))
    # a list of strings: one choice per prompt, in order
    r = client.completions.create(model=NAME, prompt=texts, max_tokens=9, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [w.outputs[0].text for w in want[:3]]
    _check_usage(r.usage, sum(len(w.prompt_token_ids) for w in want[:3]),
                 sum(len(w.outputs[0].token_ids) for w in want[:3]))
    # token ids
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=9, temperature=0)
    assert r.choices[0].text == want[3].outputs[0].text
    _check_usage(r.usage, 17, len(want[3].outputs[0].token_ids))


def test_logprobs_are_the_models(client, llm, ckpt):
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(2, 11, (12,), generator=g).tolist()
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=7, temperature=0, logprobs=3)
    (want,) = llm.generate([ids], SamplingParams(max_tokens=7, temperature=0, logprobs=3))
    c, w = r.choices[0], want.outputs[0]
    assert c.text == w.text and len(c.logprobs.token_logprobs) == len(w.token_ids)
    assert c.logprobs.tokens == [llm.tokenizer.decode([t]) for t in w.token_ids]
    torch.testing.assert_close(torch.tensor(c.logprobs.token_logprobs, dtype=torch.float64),
                               torch.tensor([lp for lp, _ in w.logprobs], dtype=torch.float64), atol=1e-4, rtol=0)
    # and the full forward of the checkpoint's model over prompt + output (the bf16 latent cache rounds)
    with torch.no_grad():
        lp = torch.log_softmax(llm.model(torch.tensor([ids + w.token_ids])).logits[0].double(), -1)
    ref = [float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(w.token_ids)]
    torch.testing.assert_close(torch.tensor(c.logprobs.token_logprobs, dtype=torch.float64),
                               torch.tensor(ref, dtype=torch.float64), atol=2e-2, rtol=0)
    for j, top in enumerate(c.logprobs.top_logprobs):
        assert len(top) <= 3 and max(top, key=top.get) == c.logprobs.tokens[j]    # greedy: the top one
    assert c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset == sorted(c.logprobs.text_offset)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None


def test_streamed_logprobs_concatenate_to_the_non_streamed_ones(client):
    g = torch.Generator().manual_seed(11)
    for kw in ({"temperature": 0}, {"temperature": 0.9, "seed": 5, "n": 2}):
        ids = torch.randint(2, 11, (9,), generator=g).tolist()
        full = client.completions.create(model=NAME, prompt=ids, max_tokens=12, logprobs=2, **kw)
        chunks = [c for c in client.completions.create(model=NAME, prompt=ids, max_tokens=12, logprobs=2, stream=True,
                                                       **kw) if c.choices]
        for i, want in enumerate(full.choices):
            mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
            assert sum(len(c.logprobs.tokens) > 0 for c in mine) >= 2     # spread over chunks, not one final one
            assert "".join(c.text for c in mine) == want.text
            def cat(field):
                return [x for c in mine for x in getattr(c.logprobs, field)]
            assert cat("tokens") == want.logprobs.tokens and cat("text_offset") == want.logprobs.text_offset
            # the values only up to rounding: the two requests ran in differently shaped batches
            torch.testing.assert_close(torch.tensor(cat("token_logprobs"), dtype=torch.float64),
                                       torch.tensor(want.logprobs.token_logprobs, dtype=torch.float64),
                                       atol=1e-5, rtol=0)
            tops = cat("top_logprobs")
            assert [list(t) for t in tops] == [list(t) for t in want.logprobs.top_logprobs]
            torch.testing.assert_close(torch.tensor([v for t in tops for v in t.values()], dtype=torch.float64),
                                       torch.tensor([v for t in want.logprobs.top_logprobs for v in t.values()],
                                                    dtype=torch.float64), atol=1e-5, rtol=0)
            assert len(want.logprobs.tokens) == 12 or want.finish_reason == "stop"


def test_client_disconnect_mid_request_frees_it(server, llm):
    g = torch.Generator().manual_seed(8)
    for _ in range(20):     # a prompt whose greedy completion runs to the length limit (no early EOS)
        p = _text_prompt(4, g)
        (w,) = llm.generate([p], SamplingParams(max_tokens=200, temperature=0))
        if w.outputs[0].finish_reason == "length":
            break
    else:
        pytest.fail("no prompt without an early EOS")
    before = _metrics(server)
    # a non-streaming request the client gives up on long before its ~100 forwards can finish (a fast
    # machine finishes them in well under a second: a late hang-up would find nothing left to abort)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", timeout=httpx.Timeout(60, read=0.05),
                   json={"model": NAME, "prompt": p, "max_tokens": 200, "temperature": 0})
    deadline = time.monotonic() + 20
    while True:
        m = _metrics(server)
        if (m[("dsmoe_requests_aborted_total", ())] > before.get(("dsmoe_requests_aborted_total", ()), 0)
                and m[("dsmoe_kv_blocks_in_use", ())] == 0 and m[("dsmoe_num_requests_running", ())] == 0):
            break
        assert time.monotonic() < deadline, {k: m.get(k) for k in [("dsmoe_requests_aborted_total", ()),
                                                                    ("dsmoe_kv_blocks_in_use", ()),
                                                                    ("dsmoe_num_requests_running", ())]}
        time.sleep(0.1)
    assert m[("dsmoe_generation_tokens_total", ())] - before[("dsmoe_generation_tokens_total", ())] < 200
    assert httpx.get(server + "/health").status_code == 200


def test_seeded_sampling_and_n_equal_llm_generate(client, llm):
    g = torch.Generator().manual_seed(2)
    p = _text_prompt(6, g)
    r = client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0.9, top_p=0.95, seed=77, n=3)
    want = llm.generate([p] * 3, [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=77 + j)
                                  for j in range(3)])
    assert [c.text for c in r.choices] == [w.outputs[0].text for w in want]
    assert r.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in want)


def test_stop_string(client, llm):
    g = torch.Generator().manual_seed(3)
    p = _text_prompt(8, g)
    (full,) = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=False))
    words = full.outputs[0].text.split()
    if len(words) < 3:
        pytest.fail(f"the fixture model ends too early for this check: {full.outputs[0].text!r}")
    stop = words[2]
    (want,) = llm.generate([p], SamplingParams(max_tokens=12, temperature=0, stop=stop))
    r = client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == want.outputs[0].text and r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text


def test_streaming_chunks_concatenate_to_the_completion(client):
    g = torch.Generator().manual_seed(4)
    p = _text_prompt(10, g)
    full = client.completions.create(model=NAME, prompt=p, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert len([c for c in chunks if c.choices]) >= 2       # really incremental, not one final chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and not chunks[-1].choices
    assert usage[0].completion_tokens == full.usage.completion_tokens
    # the raw wire format: `data:` lines ending with [DONE]
    with httpx.stream("POST", str(client.base_url) + "completions", timeout=60,
                      json={"model": NAME, "prompt": p, "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]) == \
        client.completions.create(model=NAME, prompt=p, max_tokens=5, temperature=0).choices[0].text


def test_shared_prefix_reports_cache_hits(client, llm):
    g = torch.Generator().manual_seed(5)
    head = _text_prompt(150, g)
    a = head + " " + " ".join(str(int(x)) for x in torch.randint(0, 8, (5,), generator=g))
    b = head + " " + " ".join(str(int(x)) for x in torch.randint(0, 8, (7,), generator=g))
    ra = client.completions.create(model=NAME, prompt=a, max_tokens=4, temperature=0)
    n_a = len(llm.tokenizer.encode(a, add_special_tokens=False))
    assert _check_usage(ra.usage, n_a, ra.usage.completion_tokens) == 0
    rb = client.completions.create(model=NAME, prompt=b, max_tokens=4, temperature=0)
    n_b = len(llm.tokenizer.encode(b, add_special_tokens=False))
    hit = _check_usage(rb.usage, n_b, rb.usage.completion_tokens)
    assert hit == 128, hit      # the two full 64-token blocks of the shared 151-token head
    (want,) = llm.generate([b], SamplingParams(max_tokens=4, temperature=0))
    assert rb.choices[0].text == want.outputs[0].text


def test_16_concurrent_requests_equal_their_sequential_results(server, llm):
    g = torch.Generator().manual_seed(6)
    prompts = [_text_prompt(int(n), g) for n in torch.randint(1, 40, (16,), generator=g)]
    params = [dict(temperature=0) if i % 2 else dict(temperature=0.8, seed=100 + i) for i in range(16)]
    want = [llm.generate([p], SamplingParams(max_tokens=10, **kw))[0].outputs[0].text
            for p, kw in zip(prompts, params)]
    got = [None] * 16
    barrier = threading.Barrier(16)

    def one(i):
        c = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
        barrier.wait()
        got[i] = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=10, **params[i]).choices[0].text

    ts = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert got == want


def _metrics(server) -> dict:
    fams = {f.name: f for f in prom_parser.text_string_to_metric_families(httpx.get(server + "/metrics").text)}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url = server + "/v1/completions"
    ok = {"model": NAME, "prompt": "<s> 1 2", "max_tokens": 2}
    cases = [
        ({**ok, "model": "nope"}, 404, "model"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "max_tokens": -3}, 400, "max_tokens"),
        ({**ok, "max_tokens": MAX_LEN}, 400, "max_tokens"),          # prompt + max_tokens beyond the context
        ({**ok, "prompt": "<s> " + "1 " * MAX_LEN}, 400, None),      # the prompt alone is too long
        ({**ok, "temperature": 2.5}, 400, "temperature"),
        ({**ok, "temperature": -0.1}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"),
        ({**ok, "top_p": 1.5}, 400, "top_p"),
        ({**ok, "max_tokens": "8"}, 400, "max_tokens"),               # wrong types
        ({**ok, "temperature": "hot"}, 400, "temperature"),
        ({**ok, "prompt": 5}, 400, "prompt"),
        ({**ok, "prompt": [1, "a"]}, 400, "prompt"),
        ({**ok, "prompt": []}, 400, "prompt"),
        ({**ok, "prompt": ""}, 400, "prompt"),
        ({**ok, "prompt": [999]}, 400, "prompt"),                    # outside the vocabulary
        ({**ok, "prompt": "<s> hello"}, 400, "prompt"),              # an unknown word
        ({**ok, "n": 0}, 400, "n"),
        ({"prompt": "1"}, 400, "model"),
        ({**ok, "echo": True}, 400, "echo"),
        ({**ok, "logprobs": 21}, 400, "logprobs"),
        ({**ok, "logprobs": True}, 400, "logprobs"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
        if param is not None:
            assert err["param"] == param, (body, err)
    for raw in (b"{not json", b"", b"[1, 2]"):
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code in (400, 422), (raw, r.status_code)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # the official client maps them to its exception types
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="<s> 1", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="<s> 1", max_tokens=0)
    # no chat template in the task tokenizer: chat completions say so
    r = httpx.post(server + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "1"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    r = httpx.get(server + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert client.completions.create(model=NAME, prompt="<s> 1 2", max_tokens=2, temperature=0).choices


def test_metrics_parse_and_count(server, client):
    before = _metrics(server)
    r = client.completions.create(model=NAME, prompt="<s> 3 4 5", max_tokens=6, temperature=0)
    after = _metrics(server)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)
    assert delta("dsmoe_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("dsmoe_generation_tokens_total") == r.usage.completion_tokens
    assert delta("dsmoe_requests_total", (("endpoint", "/v1/completions"), ("status", "200"))) == 1
    assert after[("dsmoe_num_requests_running", ())] == 0 and after[("dsmoe_kv_blocks_in_use", ())] == 0
    assert after[("dsmoe_kv_blocks_total", ())] > 0
    assert 0 < after[("dsmoe_spec_acceptance_rate", ())] <= 1          # the server speculates with MTP


def test_client_disconnect_mid_stream_frees_the_request(server, llm):
    g = torch.Generator().manual_seed(8)
    for _ in range(20):     # a prompt whose greedy completion runs to the length limit (no early EOS)
        p = _text_prompt(4, g)
        (w,) = llm.generate([p], SamplingParams(max_tokens=200, temperature=0))
        if w.outputs[0].finish_reason == "length":
            break
    else:
        pytest.fail("no prompt without an early EOS")
    before = _metrics(server)
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={"model": NAME, "prompt": p, "max_tokens": 200, "temperature": 0, "stream": True}) as r:
        for ln in r.iter_lines():
            if ln.startswith("data: "):
                break           # one chunk, then hang up
    deadline = time.monotonic() + 20
    while True:
        m = _metrics(server)
        if (m[("dsmoe_requests_aborted_total", ())] > before.get(("dsmoe_requests_aborted_total", ()), 0)
                and m[("dsmoe_kv_blocks_in_use", ())] == 0 and m[("dsmoe_num_requests_running", ())] == 0):
            break
        assert time.monotonic() < deadline, {k: m.get(k) for k in [("dsmoe_requests_aborted_total", ()),
                                                                    ("dsmoe_kv_blocks_in_use", ()),
                                                                    ("dsmoe_num_requests_running", ())]}
        time.sleep(0.1)
    # it never finished: no 200 tokens were counted for it
    assert m[("dsmoe_generation_tokens_total", ())] - before[("dsmoe_generation_tokens_total", ())] < 200
    assert httpx.get(server + "/health").status_code == 200


CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} |{% endfor %}"


def test_chat_completions_with_a_chat_template(ckpt, tmp_path):
    # the same weights with a chat template in the tokenizer config, served in-process (TestClient runs the
    # app's lifespan, so the engine thread is the server's own)
    import shutil

    from starlette.testclient import TestClient

    from dsmoe.serve.server import build_app

    path = str(tmp_path / "chat")
    shutil.copytree(ckpt, path)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(path, device="cpu")
        ref = LLM(path, device="cpu")
        msgs = [{"role": "user", "content": "3 1 4 1"}, {"role": "user", "content": "5 2"}]
        ids = ref.tokenizer.encode("<s> 3 1 4 1 |<s> 5 2 |", add_special_tokens=False)
        (want,) = ref.generate([ids], SamplingParams(max_tokens=8, temperature=0))
        assert want.outputs[0].text, "the check needs a non-empty completion"
        with TestClient(build_app(llm, "chat")) as tc:
            c = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=tc, max_retries=0)
            r = c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, temperature=0)
            assert r.choices[0].message.role == "assistant"
            assert r.choices[0].message.content == want.outputs[0].text
            assert r.choices[0].finish_reason == want.outputs[0].finish_reason
            _check_usage(r.usage, len(ids), len(want.outputs[0].token_ids))
            chunks = list(c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.outputs[0].text
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.prompt_tokens == len(ids)
            with pytest.raises(openai.BadRequestError):
                c.chat.completions.create(model="chat", messages=[], max_tokens=8)
            r = c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=2)
            (wl,) = ref.generate([ids], SamplingParams(max_tokens=8, temperature=0, logprobs=2))
            got = r.choices[0].logprobs.content
            assert [e.token for e in got] == [ref.tokenizer.decode([t]) for t in wl.outputs[0].token_ids]
            torch.testing.assert_close(torch.tensor([e.logprob for e in got], dtype=torch.float64),
                                       torch.tensor([v for v, _ in wl.outputs[0].logprobs], dtype=torch.float64),
                                       atol=1e-6, rtol=0)
            assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in got)
            chunks = [ch for ch in c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, temperature=0,
                                                             logprobs=True, top_logprobs=2, stream=True) if ch.choices]
            streamed = [e for ch in chunks if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
            assert [e.model_dump() for e in streamed] == [e.model_dump() for e in got]
            assert sum(bool(ch.choices[0].logprobs and ch.choices[0].logprobs.content) for ch in chunks) >= 2
            with pytest.raises(openai.BadRequestError):
                c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, top_logprobs=2)
            with pytest.raises(openai.BadRequestError):
                c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, top_p=2)
    finally:
        torch.set_num_threads(n)


def test_sigint_with_a_request_in_flight_shuts_down_cleanly(ckpt, llm, tmp_path):
    g = torch.Generator().manual_seed(10)
    for _ in range(20):     # a completion long enough to be in flight when the signal comes
        p = _text_prompt(4, g)
        if llm.generate([p], SamplingParams(max_tokens=240, temperature=0))[0].outputs[0].finish_reason == "length":
            break
    else:
        pytest.fail("no prompt without an early EOS")
    log = tmp_path / "server.log"
    proc, base = _start(ckpt, log)
    got = {}
    first = threading.Event()

    def stream():
        text = []
        try:
            with httpx.stream("POST", base + "/v1/completions", timeout=60,
                              json={"model": NAME, "prompt": p, "max_tokens": 240, "temperature": 0,
                                    "stream": True}) as r:
                for ln in r.iter_lines():
                    if ln.startswith("data: "):
                        first.set()
                        text.append(ln)
        except httpx.HTTPError as e:
            got["error"] = e
        finally:
            first.set()
            got["lines"] = text

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    t0 = time.monotonic()
    _stop(proc, log, signal.SIGINT)
    t.join(30)
    assert not t.is_alive() and time.monotonic() - t0 < 20
    # the client got either the whole stream or a cut one, never a hang
    assert got["lines"]
