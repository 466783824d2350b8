"""The endpoints ``smolora serve`` adds beside MLflow's: token streaming, the OpenAI API, metrics.

- ``POST /stream``: server-sent events, one ``data: {"text": piece}`` per piece of ``predict_stream`` as
  it is generated, then ``data: [DONE]``. Body: ``{"prompt": str | [chat messages], "params": {...},
  "adapter": name}`` (``adapter`` only for an adapter set; also accepted inside ``params``).
- ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream`` true or false), ``GET /v1/models``:
  the OpenAI wire format (:mod:`.openai_api`), so the ``openai`` client works against the server.
- ``GET /metrics``: Prometheus text (:mod:`.metrics`).

A client that goes away mid-stream is noticed (``http.disconnect``) and its generation stops at the next
token, freeing the model for the requests behind it. Bad input is a 4xx naming the field; non-streamed
requests go through the wrapper's batcher, so concurrent clients share ``generate`` calls.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mlflow.exceptions import MlflowException

from smolora_mlflow.serving import openai_api
from smolora_mlflow.serving.metrics import CONTENT_TYPE, Metrics

_END = object()
# Streams wait for the generation lock in these threads, not in the loop's default pool, which serves
# MLflow's /invocations and the routes' own work (prepare, complete): queued streams never starve them.
# Sized like the wrapper's default max_batch_size; a stream beyond that waits for a thread.
STREAM_THREADS = 32
_STREAMS = ThreadPoolExecutor(max_workers=STREAM_THREADS, thread_name_prefix="smolora-stream")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


async def _read_json(receive) -> Any:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    try:
        return json.loads(b"".join(chunks) or b"null")
    except ValueError as e:
        raise openai_api.BadRequest(f"The request body is not valid JSON: {e}.") from e


async def _send_json(send, status: int, document: Any, content_type: bytes = b"application/json") -> None:
    body = document.encode() if isinstance(document, str) else json.dumps(document).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _sse(document: Any) -> bytes:
    return f"data: {document if isinstance(document, str) else json.dumps(document)}\n\n".encode()


class Routes:
    """ASGI app: the streaming, OpenAI and metrics endpoints; every other request goes to ``fallback``."""

    def __init__(self, fallback, wrapper, metrics: Metrics, model_name: str = "default"):
        self.fallback, self.wrapper, self.metrics, self.model_name = fallback, wrapper, metrics, model_name

    async def __call__(self, scope, receive, send) -> None:
        route = (scope.get("method"), scope.get("path")) if scope["type"] == "http" else None
        if route == ("GET", "/metrics"):
            await _send_json(send, 200, self.metrics.render(), CONTENT_TYPE.encode())
        elif route == ("GET", "/v1/models"):
            names = self.wrapper.adapter_names or [self.model_name]
            await _send_json(send, 200, openai_api.models_list(names, int(self.metrics.started)))
        elif route in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/stream")):
            try:
                if route[1] == "/stream":
                    await self._stream_endpoint(receive, send)
                else:
                    await self._openai(route[1], receive, send)
            except openai_api.BadRequest as e:
                await _send_json(send, e.status, e.body() if route[1] != "/stream" else
                                 {"error_code": "INVALID_PARAMETER_VALUE", "message": e.message})
            except MlflowException as e:
                status = e.get_http_status_code()
                await _send_json(send, status, openai_api.BadRequest(e.message, status=status).body()
                                 if route[1] != "/stream" else {"error_code": e.error_code, "message": e.message})
            except ConnectionError:
                return
        else:
            await self.fallback(scope, receive, send)

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

    async def _openai(self, path: str, receive, send) -> None:
        req = openai_api.parse(await _read_json(receive), "chat" if path.endswith("chat/completions") else
                               "completions")
        adapter = self._adapter_for(req.model)
        # Checked (size limits first) and tokenized once: the prompt side of usage comes from here.
        prepared = await asyncio.to_thread(self.wrapper.prepare, req.model_input, req.params, adapter)
        max_new, prompt_tokens = prepared.params["max_new_tokens"], sum(prepared.prompt_tokens)
        if not req.stream:
            texts = await asyncio.to_thread(self.wrapper.complete_prepared, prepared)
            # `echo` returns the prompt too: completion tokens (usage, finish_reason) count only what is new
            tokens = [self.wrapper.count_new_tokens(prepared.new_text(i, t)) for i, t in enumerate(texts)]
            await _send_json(send, 200, openai_api.response(req, texts, tokens, prompt_tokens, max_new))
            return
        cancel = threading.Event()
        pieces = self.wrapper.stream_prepared(prepared, cancel)
        text: list[str] = []
        first = [True]

        def encode(piece: str) -> bytes:
            text.append(piece)
            out = _sse(openai_api.chunk(req, piece, first=first[0]))
            first[0] = False
            return out

        def tail() -> list[bytes]:
            n = self.wrapper.count_new_tokens(prepared.new_text(0, "".join(text)))
            events = [_sse(openai_api.chunk(req, None, openai_api._finish(n, max_new), first=first[0]))]
            if req.include_usage:
                events.append(_sse(openai_api.chunk(req, None, usage=openai_api._usage(prompt_tokens, n))))
            return [*events, _sse("[DONE]")]

        await self._pump(receive, send, pieces, cancel, encode, tail, prepared.adapter)

    # ------------------------------------------------------------------------------------------------
    # /stream

    async def _stream_endpoint(self, receive, send) -> None:
        body = await _read_json(receive)
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
        pieces = self.wrapper.stream_prepared(prepared, cancel)
        await self._pump(receive, send, pieces, cancel, lambda p: _sse({"text": p}), lambda: [_sse("[DONE]")],
                         prepared.adapter)

    async def _pump(self, receive, send, pieces: Iterator[str], cancel: threading.Event, encode, tail,
                    adapter: str) -> None:
        """Send each piece as it comes; stop generating when the client disconnects."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            cancel.set()

        watcher = asyncio.ensure_future(watch())
        self.metrics.inc("smolora_streams_active")
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        first, finished = True, False
        try:
            while not gone.is_set():
                piece = await loop.run_in_executor(_STREAMS, next, pieces, _END)
                if piece is _END or gone.is_set():
                    break
                if first:
                    self.metrics.observe("smolora_time_to_first_token_seconds", time.monotonic() - started,
                                         adapter=adapter)
                    first = False
                await send({"type": "http.response.body", "body": encode(piece), "more_body": True})
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"".join(tail()), "more_body": False})
                finished = True  # uvicorn's receive() answers http.disconnect once a response is complete
        except OSError:  # ASGI 2.4 servers raise on send once the client is gone
            gone.set()
        except Exception as e:  # the response has started: report in the stream, never silently
            event = json.dumps({"error_code": getattr(e, "error_code", "INTERNAL_ERROR"), "message": str(e)})
            await send({"type": "http.response.body", "body": f"event: error\ndata: {event}\n\n".encode(),
                        "more_body": False})
        finally:
            cancel.set()
            await loop.run_in_executor(_STREAMS, pieces.close)
            watcher.cancel()
            self.metrics.inc("smolora_streams_active", -1)
            if gone.is_set() and not finished:
                self.metrics.inc("smolora_streams_cancelled_total", adapter=adapter)
