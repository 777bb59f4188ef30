"""``dsmoe serve CHECKPOINT``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over :class:`dsmoe.serve.LLM`.

One engine thread steps the engine while any request is unfinished; HTTP handlers queue requests under
the engine's lock (so every client joins the same continuous batch) and wait on an asyncio queue that
the engine thread feeds. ``usage`` carries the DeepSeek API's context-cache fields
(``prompt_cache_hit_tokens`` + ``prompt_cache_miss_tokens`` = ``prompt_tokens``). See docs/serve.md."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from typing import List, Optional, Union

import prometheus_client  # noqa: F401  (the serve extra: a missing one fails at import, with a hint)
import uvicorn  # noqa: F401
from fastapi import Request    # module level: FastAPI resolves the handlers' (string) annotations here
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

__all__ = ["main", "build_app", "EngineLoop"]

log = logging.getLogger("dsmoe.serve")
DISCONNECT_POLL_S = 0.25     # a pause between reads of a connection that sends more than its body


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def _error_body(message, type_="invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class EngineLoop:
    """Owns the engine; a background thread steps it and hands each request's progress to its waiter."""

    def __init__(self, llm, metrics=None):
        self.llm = llm
        self.metrics = metrics
        self.cv = threading.Condition(threading.RLock())
        self.waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, bool]] = {}
        self.sent: dict[str, int] = {}
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="dsmoe-engine", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        with self.cv:
            self._stop = True
            for rid in list(self.waiters):
                self.llm.abort_request(rid)
                self._post(rid, ("error", "the server is shutting down"))
            self.cv.notify_all()
        self.thread.join(timeout=10)

    def submit(self, prompt, params, stream: bool) -> tuple[str, asyncio.Queue]:
        """Queues one request (ValueError from the engine's checks propagates: nothing is queued)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = uuid.uuid4().hex
        with self.cv:
            if self._stop:
                raise APIError(503, "the server is shutting down", type_="server_error")
            self.llm.add_request(prompt, params, request_id=rid)
            self.waiters[rid] = (loop, q, stream)
            self.sent[rid] = 0
            self.cv.notify_all()
        return rid, q

    def abort(self, rid: str) -> None:
        with self.cv:
            if rid in self.waiters:
                if self.llm.abort_request(rid) and self.metrics is not None:
                    self.metrics.aborted.inc()
                self.waiters.pop(rid, None)
                self.sent.pop(rid, None)

    def _post(self, rid, event):
        w = self.waiters.get(rid)
        if w is not None:
            loop, q, _ = w
            try:
                loop.call_soon_threadsafe(q.put_nowait, event)
            except RuntimeError:     # the event loop is closed (shutdown)
                pass

    def _run(self):
        while True:
            with self.cv:
                while not self._stop and not self.llm.has_unfinished_requests():
                    self.cv.wait(0.5)
                if self._stop:
                    return
                try:
                    outs = self.llm.step()
                except Exception as e:    # noqa: BLE001 - a failing step must not stop the server
                    log.exception("engine step failed")
                    for rid in list(self.waiters):
                        self.llm.abort_request(rid)
                        self._post(rid, ("error", f"engine error: {type(e).__name__}: {e}"))
                    self.waiters.clear()
                    continue
                for o in outs:
                    self._post(o.request_id, ("done", o))
                    self.waiters.pop(o.request_id, None)
                    self.sent.pop(o.request_id, None)
                streaming = [r for r, w in self.waiters.items() if w[2]]
                if streaming:
                    part, lps = self.llm.partial_output_ids(), self.llm.partial_logprobs()
                    for rid in streaming:
                        ids = part.get(rid)
                        if ids is not None and len(ids) > self.sent.get(rid, 0):
                            self.sent[rid] = len(ids)
                            self._post(rid, ("delta", (ids, lps.get(rid))))
                if self.metrics is not None:
                    self.metrics.observe_engine(self.llm)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsmoe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("dsmoe_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dsmoe_generation_tokens", "tokens generated for finished requests",
                                         registry=r)
        self.cache_hit_tokens = Counter("dsmoe_prompt_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                        registry=r)
        self.aborted = Counter("dsmoe_requests_aborted", "requests dropped unfinished (the client went away)",
                               registry=r)
        self.running = Gauge("dsmoe_num_requests_running", "requests in the running batch", registry=r)
        self.waiting = Gauge("dsmoe_num_requests_waiting", "requests waiting for admission", registry=r)
        self.blocks = Gauge("dsmoe_kv_blocks_in_use", "latent-cache blocks held by requests", registry=r)
        self.blocks_total = Gauge("dsmoe_kv_blocks_total", "latent-cache blocks in the pool", registry=r)
        self.acceptance = Gauge("dsmoe_spec_acceptance_rate", "MTP draft tokens accepted / proposed (0 before any draft)",
                                registry=r)

    def observe_engine(self, llm):
        self.running.set(len(llm.running))
        self.waiting.set(len(llm.waiting))
        bm = llm.bm
        self.blocks.set(sum(1 for c in bm.refcount if c > 0))
        self.blocks_total.set(bm.num_blocks)
        self.acceptance.set(llm.acceptance_rate() or 0.0)


# request bodies at module level: FastAPI resolves the handlers' (postponed) annotations in this module's
# globals
Num = Union[StrictInt, float]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    # strict: "0.5" for a number or 1 for a string is a wrong type (400), not something to coerce
    model_config = ConfigDict(extra="ignore", strict=True)
    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Num] = None
    top_p: Optional[Num] = None
    n: StrictInt = 1
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, List[StrictStr]]] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Union[StrictBool, StrictInt]] = None


class CompletionRequest(_Common):
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    echo: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: StrictStr
    content: StrictStr


class ChatRequest(_Common):
    messages: List[ChatMessage]
    top_logprobs: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None


def build_app(llm, model_name: str):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .params import SamplingParams

    metrics = Metrics()
    engine = EngineLoop(llm, metrics)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="dsmoe serve", lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())
    max_len = llm.max_model_len

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(_error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            param = loc[0] if loc else None
            msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                            for er in errs[:5])
        return JSONResponse(_error_body(msg, param=param, code="invalid_type" if param else "invalid_json"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(_error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error"),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error")
        return JSONResponse(_error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _log(request: Request, call_next):
        t0 = time.perf_counter()
        resp = await call_next(request)
        metrics.requests.labels(request.url.path, str(resp.status_code)).inc()
        log.info("%s %s %s %d %.1f ms", request.client.host if request.client else "-", request.method,
                 request.url.path, resp.status_code, 1e3 * (time.perf_counter() - t0))
        return resp

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dsmoe", "max_model_len": max_len}]}

    @app.get("/metrics")
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        with engine.cv:
            metrics.observe_engine(llm)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- shared request handling
    def _check_common(req, max_tokens, prompt_lens, logprobs=None):
        if req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'",
                           "model", code="model_not_found")
        if req.n < 1:
            raise APIError(400, f"'n' must be >= 1, got {req.n}", "n")
        if req.temperature is not None and not 0 <= req.temperature <= 2:
            raise APIError(400, f"'temperature' must be in [0, 2], got {req.temperature}", "temperature")
        if req.top_p is not None and not 0 < req.top_p <= 1:
            raise APIError(400, f"'top_p' must be in (0, 1], got {req.top_p}", "top_p")
        if max_tokens is not None and max_tokens <= 0:
            raise APIError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
        longest = max(prompt_lens)
        if max_tokens is not None and longest + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens; the prompt has {longest} "
                           f"and max_tokens asks for {max_tokens} more", "max_tokens", code="context_length_exceeded")
        if longest >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens; the prompt has {longest}",
                           "prompt", code="context_length_exceeded")
        stop = req.stop
        if isinstance(stop, list) and not stop:
            stop = None
        if stop is not None and llm.tokenizer is None:
            raise APIError(400, "'stop' strings need a tokenizer; this checkpoint has none", "stop")

        def params(i, n_prompt):
            mt = max_tokens if max_tokens is not None else max_len - n_prompt
            seed = None if req.seed is None else req.seed + i
            try:
                return SamplingParams(max_tokens=mt, temperature=1.0 if req.temperature is None else float(req.temperature),
                                      top_p=1.0 if req.top_p is None else float(req.top_p), seed=seed, stop=stop,
                                      logprobs=logprobs)
            except ValueError as e:
                raise APIError(400, str(e)) from None
        return params

    def _tokenize(prompts):
        out = []
        for p in prompts:
            if isinstance(p, str):
                if llm.tokenizer is None:
                    raise APIError(400, "text prompts need a tokenizer; this checkpoint has none (send token ids)",
                                   "prompt")
                ids = llm.tokenizer.encode(p, add_special_tokens=False)
            else:
                ids = list(p)
            if not ids:
                raise APIError(400, "a prompt is empty (at least one token is needed)", "prompt")
            V = llm.config.vocab_size
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {V}), got {bad[:5]} (unknown words map "
                               f"outside the vocabulary)", "prompt")
            out.append(ids)
        return out

    def _tok(i: int) -> str:
        return llm.tokenizer.decode([i]) if llm.tokenizer is not None else str(i)

    def _completion_logprobs(ids, lps, a=0, b=None):
        """Tokens ``a:b`` of a completion (a streamed chunk's share); offsets count from the completion's start."""
        if lps is None:
            return None
        b = len(ids) if b is None else b
        offsets = [len(llm.tokenizer.decode(ids[:j], skip_special_tokens=True)) if llm.tokenizer is not None else 0
                   for j in range(a, b)]
        return {"tokens": [_tok(t) for t in ids[a:b]], "token_logprobs": [lp for lp, _ in lps[a:b]],
                "top_logprobs": [{_tok(i): v for i, v in top} for _, top in lps[a:b]], "text_offset": offsets}

    def _chat_logprobs(ids, lps, a=0, b=None):
        if lps is None:
            return None

        def entry(i, v):
            t = _tok(i)
            return {"token": t, "logprob": v, "bytes": list(t.encode())}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for t, (lp, top) in zip(ids[a:b], lps[a:b])]}

    def _usage(outs_by_prompt) -> dict:
        prompt = sum(len(o[0].prompt_token_ids) for o in outs_by_prompt)
        hit = sum(o[0].num_cached_tokens for o in outs_by_prompt)
        comp = sum(len(x.outputs[0].token_ids) for o in outs_by_prompt for x in o)
        return {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp,
                "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt - hit}

    def _count(outs_by_prompt):
        u = _usage(outs_by_prompt)
        metrics.prompt_tokens.inc(u["prompt_tokens"])
        metrics.generation_tokens.inc(u["completion_tokens"])
        metrics.cache_hit_tokens.inc(u["prompt_cache_hit_tokens"])
        return u

    async def _until_disconnect(request: Request):
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(DISCONNECT_POLL_S)

    async def _collect(subs, request: Request):
        # nothing cancels a non-streaming handler when its client hangs up: a watcher on the connection
        # (Request.is_disconnected loses the message inside the logging middleware) ends the wait, and the
        # finally below frees the blocks of a request nobody will read
        gone = asyncio.ensure_future(_until_disconnect(request))
        outs = []
        try:
            for rid, q in subs:
                while True:
                    get = asyncio.ensure_future(q.get())
                    try:
                        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not get.done():
                            get.cancel()
                    if not get.done() or get.cancelled():
                        raise APIError(499, "the client closed the request", type_="client_closed")
                    kind, val = get.result()
                    if kind == "done":
                        outs.append(val)
                        break
                    if kind == "error":
                        raise APIError(500, val, type_="server_error")
        finally:
            gone.cancel()
            for rid, _ in subs:
                engine.abort(rid)     # no-op for finished ones; frees blocks when the client went away
        return outs

    def _submit_all(ids_list, params, stream):
        subs = []
        try:
            for i, ids in enumerate(ids_list):
                subs.append(engine.submit(ids, params(i, len(ids)), stream=stream))
        except ValueError as e:
            for rid, _ in subs:
                engine.abort(rid)
            raise APIError(400, str(e)) from None
        except BaseException:
            for rid, _ in subs:
                engine.abort(rid)
            raise
        return subs

    def _delta_text(ids, full: bool, stop):
        text = llm.tokenizer.decode(ids, skip_special_tokens=True) if llm.tokenizer is not None else ""
        if not full and stop:
            # hold back what could be the start of a stop string (it is cut from the final text)
            text = text[: max(0, len(text) - max(len(s) for s in stop) + 1)]
        return text

    def _stream(subs, n, make_chunk, usage_chunk, include_usage, stop, prompt_of):
        async def gen():
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(idx, q):
                while True:
                    ev = await q.get()
                    await merged.put((idx, ev))
                    if ev[0] in ("done", "error"):
                        return
            tasks = [asyncio.create_task(pump(i, q)) for i, (_, q) in enumerate(subs)]
            sent_text = [""] * len(subs)
            sent_tok = [0] * len(subs)
            done: dict[int, object] = {}
            try:
                while len(done) < len(subs):
                    idx, (kind, val) = await merged.get()
                    if kind == "error":
                        yield f"data: {json.dumps(_error_body(val, 'server_error'))}\n\n"
                        return
                    if kind == "delta":
                        ids, lps = val
                        text = _delta_text(ids, False, stop)
                        finish = None
                    else:
                        done[idx] = val
                        ids, lps = val.outputs[0].token_ids, val.outputs[0].logprobs
                        text, finish = val.outputs[0].text, val.outputs[0].finish_reason
                    if llm.tokenizer is not None and text.startswith(sent_text[idx]):
                        delta = text[len(sent_text[idx]):]
                    else:
                        delta = ""
                    # a chunk carries the logprobs of the tokens since the previous chunk, so new tokens
                    # get a chunk even when their text is held back (a partial stop string, no tokenizer)
                    if delta or finish or (lps is not None and len(ids) > sent_tok[idx]):
                        sent_text[idx] = sent_text[idx] + delta
                        a, sent_tok[idx] = sent_tok[idx], len(ids)
                        yield f"data: {json.dumps(make_chunk(idx, delta, finish, ids, lps, a))}\n\n"
                if include_usage:
                    by_prompt = [[done[p * n + j] for j in range(n)] for p in range(len(subs) // n)]
                    yield f"data: {json.dumps(usage_chunk(_count(by_prompt)))}\n\n"
                else:
                    _count([[done[p * n + j] for j in range(n)] for p in range(len(subs) // n)])
                yield "data: [DONE]\n\n"
            finally:
                for t in tasks:
                    t.cancel()
                for rid, _ in subs:
                    engine.abort(rid)    # a client that disconnected mid-stream frees its blocks
        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.echo:
            raise APIError(400, "'echo' is not supported (only false)", "echo")
        lp = req.logprobs
        if lp is not None and (isinstance(lp, bool) or not 0 <= lp <= 20):
            raise APIError(400, f"'logprobs' must be an int in [0, 20], got {lp!r}", "logprobs")
        p = req.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and isinstance(p[0], int):
            prompts = [p]
        elif not p:
            raise APIError(400, "'prompt' is empty", "prompt")
        else:
            prompts = list(p)
        ids_list = _tokenize(prompts)
        # the OpenAI default for completions is 16 tokens
        params = _check_common(req, req.max_tokens if req.max_tokens is not None else 16, [len(x) for x in ids_list],
                               lp)
        expanded = [ids for ids in ids_list for _ in range(req.n)]
        subs = _submit_all(expanded, lambda i, n_prompt: params(i % req.n, n_prompt), req.stream)
        cid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or None)
        if req.stream:
            def chunk(idx, text, finish, ids, lps, a):
                return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": idx, "text": text, "logprobs": _completion_logprobs(ids, lps, a),
                                     "finish_reason": finish}]}

            def uchunk(u):
                return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [], "usage": u}
            inc = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(subs, req.n, chunk, uchunk, inc, stop, None)
        outs = await _collect(subs, request)
        by_prompt = [outs[i * req.n:(i + 1) * req.n] for i in range(len(ids_list))]
        choices = [{"index": i, "text": o.outputs[0].text, "logprobs": _completion_logprobs(o.outputs[0].token_ids, o.outputs[0].logprobs),
                    "finish_reason": o.outputs[0].finish_reason} for i, o in enumerate(outs)]
        return {"id": cid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
                "usage": _count(by_prompt)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        tok = llm.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, f"The model '{model_name}' has no chat template in its tokenizer; use /v1/completions",
                           "messages", code="no_chat_template")
        if not req.messages:
            raise APIError(400, "'messages' is empty", "messages")
        try:
            ids = tok.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                          tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        except Exception as e:    # noqa: BLE001 - a template that fails on these messages is the client's 400
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        ids_list = _tokenize([list(ids)])
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise APIError(400, f"'logprobs' must be a boolean for chat completions, got {req.logprobs!r}", "logprobs")
        tl = req.top_logprobs
        if tl is not None and not 0 <= tl <= 20:
            raise APIError(400, f"'top_logprobs' must be an int in [0, 20], got {tl}", "top_logprobs")
        if tl is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        params = _check_common(req, mt, [len(ids_list[0])], (tl or 0) if req.logprobs else None)
        subs = _submit_all([ids_list[0]] * req.n, params, req.stream)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or None)
        if req.stream:
            first = set()

            def chunk(idx, text, finish, ids, lps, a):
                delta = {"content": text} if text else {}
                if idx not in first:
                    first.add(idx)
                    delta = {"role": "assistant", **delta}
                return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": idx, "delta": delta, "logprobs": _chat_logprobs(ids, lps, a),
                                     "finish_reason": finish}]}

            def uchunk(u):
                return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [], "usage": u}
            inc = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(subs, req.n, chunk, uchunk, inc, stop, None)
        outs = await _collect(subs, request)
        choices = [{"index": i, "message": {"role": "assistant", "content": o.outputs[0].text},
                    "logprobs": _chat_logprobs(o.outputs[0].token_ids, o.outputs[0].logprobs),
                    "finish_reason": o.outputs[0].finish_reason} for i, o in enumerate(outs)]
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_name, "choices": choices,
                "usage": _count([outs])}

    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dsmoe serve", description=__doc__)
    p.add_argument("checkpoint", help="checkpoint folder (config.json, safetensors, tokenizer files)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--num-blocks", type=int, default=None, help="64-token latent-cache blocks (default: enough for "
                   "max-num-seqs full-length sequences)")
    p.add_argument("--speculative", choices=["mtp", "none"], default="none")
    p.add_argument("--num-speculative-tokens", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)

    import torch

    from . import LLM

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not os.path.isdir(a.checkpoint):
        p.error(f"argument 'checkpoint': {a.checkpoint!r} is not a folder")
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        llm = LLM(a.checkpoint, device=dev, dtype=getattr(torch, a.dtype) if a.dtype else None,
                  max_num_seqs=a.max_num_seqs, num_blocks=a.num_blocks,
                  speculative=None if a.speculative == "none" else a.speculative,
                  num_speculative_tokens=a.num_speculative_tokens)
    except ValueError as e:
        p.error(str(e))
    name = a.served_model_name or os.path.basename(os.path.normpath(a.checkpoint))
    app = build_app(llm, name)
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, then the shutdown hook aborts what is in flight
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
