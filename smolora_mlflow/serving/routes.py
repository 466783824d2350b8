"""The endpoints ``smolora serve`` adds beside MLflow's: token streaming, the OpenAI API, metrics.

- ``POST /stream``: server-sent events, one ``data: {"text": piece}`` per piece of ``predict_stream`` as
  it is generated, then ``data: [DONE]``. Body: ``{"prompt": str | [chat messages], "params": {...},
  "adapter": name}`` (``adapter`` only for an adapter set; also accepted inside ``params``).
- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` true or false), ``GET /v1/models``:
  the OpenAI wire format (:mod:`.openai_api`), so the ``openai`` client works against the server.
- ``GET /metrics``: Prometheus text (:mod:`.metrics`).

A client that goes away mid-stream is noticed (``http.disconnect``) and its generation stops at the next
token, freeing the model for the requests behind it. Bad input is a 4xx naming the field; non-streamed
requests and streams alike go through the model's one scheduler, so concurrent clients share forwards.
Routing is Starlette's (``Router`` with MLflow's app as the default), as in MLflow's own scoring app.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlflow.exceptions import MlflowException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route, Router

from smolora_mlflow.flavor.streams import LoopEvents
from smolora_mlflow.serving import openai_api
from smolora_mlflow.serving.metrics import CONTENT_TYPE, Metrics

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body or b"null")
    except ValueError as e:
        raise openai_api.BadRequest(f"The request body is not valid JSON: {e}.") from e


def _sse(document: Any) -> bytes:
    return f"data: {document if isinstance(document, str) else json.dumps(document)}\n\n".encode()


class EventStream(Response):
    """A server-sent-events response fed by a :class:`~smolora_mlflow.flavor.streams.TokenStream`.

    Starlette's ``StreamingResponse`` notices a client that left only when a send fails (ASGI 2.4 servers) or
    by cancelling the body iterator; this one watches ``http.disconnect`` itself and sets the stream's
    ``cancel`` at once, so the scheduler frees the row at the next token even while no piece is due. Pieces
    arrive on the loop itself (``LoopEvents``): no thread per stream waits for them.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(self, pieces, cancel: threading.Event, encode, tail, adapter: str, metrics: Metrics):
        # Not Response.__init__: it would declare `content-length: 0` for the empty body it is given.
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", SSE_MEDIA_TYPE.encode())] + [
            (k.encode(), v.encode()) for k, v in SSE_HEADERS.items()]
        self.pieces, self.cancel, self.encode, self.tail = pieces, cancel, encode, tail
        self.adapter, self.metrics = adapter, metrics

    async def __call__(self, scope, receive, send) -> None:
        started = time.monotonic()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            self.pieces.interrupt()  # frees the row at the next token and ends the wait below now

        watcher = asyncio.ensure_future(watch())
        self.metrics.inc("smolora_streams_active")
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        first, finished = True, False
        try:
            # Pieces that arrived while the last send was out go in one send: the same events, fewer writes.
            while not gone.is_set() and (pieces := await self.pieces.next_pieces()) is not None and not gone.is_set():
                if first:
                    self.metrics.observe("smolora_time_to_first_token_seconds", time.monotonic() - started,
                                         adapter=self.adapter)
                    first = False
                await send({"type": "http.response.body", "body": b"".join(map(self.encode, pieces)),
                            "more_body": True})
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"".join(self.tail()), "more_body": False})
                finished = True  # uvicorn's receive() answers http.disconnect once a response is complete
        except OSError:  # ASGI 2.4 servers raise on send once the client is gone
            gone.set()
        except Exception as e:  # the response has started: report in the stream, never silently
            event = json.dumps({"error_code": getattr(e, "error_code", "INTERNAL_ERROR"), "message": str(e)})
            await send({"type": "http.response.body", "body": f"event: error\ndata: {event}\n\n".encode(),
                        "more_body": False})
        finally:
            self.cancel.set()
            self.pieces.close()
            watcher.cancel()
            self.metrics.inc("smolora_streams_active", -1)
            if gone.is_set() and not finished:
                self.metrics.inc("smolora_streams_cancelled_total", adapter=self.adapter)


class _Route(Route):
    """A route whose path matches with another method is not this route's: the request goes on to MLflow's app,
    which answers it (404/405) in JSON as it answers every path it does not serve, instead of Starlette's
    plain-text 405."""

    def matches(self, scope) -> tuple[Match, dict[str, Any]]:
        match, child = super().matches(scope)
        return (Match.NONE, {}) if match == Match.PARTIAL else (match, child)


def _error(e: Exception, openai: bool) -> JSONResponse:
    if isinstance(e, openai_api.BadRequest):
        body = e.body() if openai else {"error_code": "INVALID_PARAMETER_VALUE", "message": e.message}
        return JSONResponse(body, e.status)
    status = e.get_http_status_code()
    body = openai_api.BadRequest(e.message, status=status).body() if openai else {"error_code": e.error_code,
                                                                                  "message": e.message}
    return JSONResponse(body, status)


class Routes:
    """The streaming, OpenAI and metrics endpoints as Starlette routes; any other request goes to ``fallback``
    (MLflow's scoring app), as do lifespan events.

    The first request also gives the event loop a default executor wide enough for every request that may
    wait for the scheduler at once (``loop.set_default_executor``): MLflow's ``/invocations`` and the routes'
    own work run there through ``asyncio.to_thread``, and the loop's own default is ``min(32, cpus + 4)``
    threads, 6 on a 2-core machine, which would keep the 7th concurrent request out of the running batch.
    """

    def __init__(self, fallback, wrapper, metrics: Metrics, model_name: str = "default", request_threads: int = 64):
        self.fallback, self.wrapper, self.metrics, self.model_name = fallback, wrapper, metrics, model_name
        self.request_threads = request_threads
        self._widened = False
        self.router = Router(routes=[
            _Route("/metrics", self.metrics_text, methods=["GET"]),
            _Route("/v1/models", self.models, methods=["GET"]),
            _Route("/v1/completions", self.completions, methods=["POST"]),
            _Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            _Route("/stream", self.stream, methods=["POST"]),
        ], default=fallback)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        if not self._widened:
            self._widened = True
            asyncio.get_running_loop().set_default_executor(
                ThreadPoolExecutor(max_workers=self.request_threads, thread_name_prefix="smolora-request"))
        await self.router(scope, receive, send)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        names = self.wrapper.adapter_names or [self.model_name]
        return JSONResponse(openai_api.models_list(names, int(self.metrics.started)))

    async def completions(self, request: Request) -> Response:
        return await self._guarded(self._openai, request, "completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self._guarded(self._openai, request, "chat")

    async def stream(self, request: Request) -> Response:
        return await self._guarded(self._stream_endpoint, request, None)

    async def _guarded(self, handler, request: Request, kind: str | None) -> Response:
        try:
            return await handler(request, kind)
        except (openai_api.BadRequest, MlflowException) as e:
            return _error(e, openai=kind is not None)
        except ClientDisconnect:  # nobody is left to answer
            return Response(status_code=400)

    # ------------------------------------------------------------------------------------------------
    # OpenAI

    def _adapter_for(self, model: str) -> str | None:
        names = self.wrapper.adapter_names
        if names is None:
            return None  # a single model answers to any name
        if model not in names:
            raise openai_api.BadRequest(f"The model `{model}` does not exist; this server's adapters are {names}.",
                                        "model", status=404, code="model_not_found")
        return model

    async def _openai(self, request: Request, kind: str) -> Response:
        req = openai_api.parse(await _read_json(request), kind)
        adapter = self._adapter_for(req.model)
        # Checked (size limits first) and tokenized once: the prompt side of usage comes from here.
        prepared = await asyncio.to_thread(self.wrapper.prepare, req.model_input, req.params, adapter)
        max_new, prompt_tokens = prepared.params["max_new_tokens"], sum(prepared.prompt_tokens)
        echo = bool(prepared.params.get("return_full_text"))
        if not req.stream:
            done = await asyncio.to_thread(self.wrapper.complete_results, prepared)
            texts = [p + c.text if echo else c.text for p, c in zip(prepared.prompts, done, strict=True)]
            # usage and finish_reason from the generated token ids (`echo` adds text, not tokens)
            tokens = [len(c.token_ids) for c in done]
            return JSONResponse(openai_api.response(req, texts, tokens, prompt_tokens, max_new,
                                                    [c.finish_reason for c in done]))
        cancel = threading.Event()
        pieces = self.wrapper.stream_prepared(prepared, cancel, LoopEvents(asyncio.get_running_loop()))
        first = [True]

        def encode(piece: str) -> bytes:
            out = _sse(openai_api.chunk(req, piece, first=first[0]))
            first[0] = False
            return out

        def tail() -> list[bytes]:
            result = pieces.result
            n = len(result.token_ids) if result is not None else 0
            reason = result.finish_reason if result is not None else "stop"
            events = [_sse(openai_api.chunk(req, None, reason, first=first[0]))]
            if req.include_usage:
                events.append(_sse(openai_api.chunk(req, None, usage=openai_api._usage(prompt_tokens, n))))
            return [*events, _sse("[DONE]")]

        return EventStream(pieces, cancel, encode, tail, prepared.adapter, self.metrics)

    # ------------------------------------------------------------------------------------------------
    # /stream

    async def _stream_endpoint(self, request: Request, _kind: None) -> Response:
        body = await _read_json(request)
        if not isinstance(body, dict) or ("prompt" not in body and "messages" not in body):
            raise openai_api.BadRequest('The body must be a JSON object with "prompt" (a string or chat messages) '
                                        'and optionally "params" and "adapter".', "prompt")
        unknown = sorted(set(body) - {"prompt", "messages", "params", "adapter"})
        if unknown:
            raise openai_api.BadRequest(f"Unsupported field(s) {unknown}; send prompt, params, adapter.", unknown[0])
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise openai_api.BadRequest(f"`params` must be an object, got {params!r}.", "params")
        params = dict(params)
        adapter = body.get("adapter", params.pop("adapter", None))
        model_input = body["prompt"] if "prompt" in body else body["messages"]
        if isinstance(model_input, list) and model_input and all(isinstance(m, dict) for m in model_input):
            model_input = {"messages": model_input}
        elif not isinstance(model_input, str):
            raise openai_api.BadRequest(f"`prompt` must be a string or a list of chat messages, got "
                                        f"{model_input!r:.200}.", "prompt")
        cancel = threading.Event()
        prepared = await asyncio.to_thread(self.wrapper.prepare, model_input, params, adapter)
        pieces = self.wrapper.stream_prepared(prepared, cancel, LoopEvents(asyncio.get_running_loop()))
        return EventStream(pieces, cancel, lambda p: _sse({"text": p}), lambda: [_sse("[DONE]")], prepared.adapter,
                           self.metrics)
