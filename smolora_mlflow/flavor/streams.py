"""What a request reads back from the :mod:`.scheduler`: its :class:`Completion`, or a :class:`TokenStream` of pieces.

A stream's events (``("piece", text)``, then ``("end", Completion)`` or ``("error", exception)``) are put by the
scheduler thread into a ``queue.SimpleQueue`` (read by blocking iteration) or into :class:`LoopEvents`, which
hands them to an asyncio loop so a server reads them without a thread per stream.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Completion:
    """One prompt's answer: the text (without the prompt), the generated token ids and why it ended."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (end-of-sequence token), "length" (max_new_tokens) or "cancelled"


class Events(Protocol):
    """Where the scheduler thread puts a stream's events: ``queue.SimpleQueue`` or :class:`LoopEvents`."""

    def put(self, item: tuple[str, Any]) -> None: ...
    def get(self) -> Any: ...


class _Mailbox:
    """Items posted to one asyncio loop from the scheduler thread, delivered in one loop callback.

    A step produces a piece for every streamed row; one ``call_soon_threadsafe`` per piece would wake the loop
    (a write to its self-pipe) once per row and token. Posts made while a delivery is pending join it.
    """

    _by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _made = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._lock, self._items = loop, threading.Lock(), []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        with cls._made:
            box = cls._by_loop.get(loop)
            if box is None:
                box = cls._by_loop[loop] = cls(loop)
            return box

    def post(self, target: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._items.append((target, item))
            if len(self._items) > 1:  # a delivery is already scheduled and has not run yet
                return
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop closed (server shutting down): nobody reads any more
            with self._lock:
                self._items.clear()

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for target, item in items:
            target.put_nowait(item)


class LoopEvents:
    """A stream's events handed straight to an asyncio loop (``put`` from the scheduler thread, ``await get()``
    in the loop): a server reads pieces without a thread per stream in between."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._box, self._queue = _Mailbox.of(loop), asyncio.Queue()

    def put(self, item: tuple[str, Any]) -> None:
        self._box.post(self._queue, item)

    async def get(self) -> tuple[str, Any]:
        return await self._queue.get()

    def get_nowait(self) -> tuple[str, Any] | None:
        """The next event if one has arrived, else None (in the loop)."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def interrupt(self) -> None:
        """End the reader's wait now (in the loop; the client left): it reads the end of a cancelled stream."""
        self._queue.put_nowait(("end", Completion("", (), "cancelled")))


class TokenStream(Iterator[str]):
    """The pieces of one streamed prompt as they are generated; :attr:`result` once it is exhausted.

    Read it as an iterator (blocking), or with ``await next_piece()`` when it was opened with
    :class:`LoopEvents`. Closing it (or setting ``cancel``) frees its row at the next token.
    """

    def __init__(self, prompt: str, params: dict[str, Any], events: Events, cancel: threading.Event):
        self._events, self._cancel = events, cancel
        self.result: Completion | None = None
        self._pending_prompt = prompt if params.get("return_full_text") else None

    def _take(self, kind: str, value: Any) -> str | None:
        if kind == "piece":
            return value
        if kind == "error":
            self.result = Completion("", (), "cancelled")
            raise value
        self.result = value
        return None

    def _prompt_first(self) -> str | None:
        prompt, self._pending_prompt = self._pending_prompt, None
        return prompt

    def __next__(self) -> str:
        if self.result is not None:
            raise StopIteration
        if (prompt := self._prompt_first()) is not None:
            return prompt
        piece = self._take(*self._events.get())
        if piece is None:
            raise StopIteration
        return piece

    async def next_piece(self) -> str | None:
        """The next piece, or None at the end (a stream opened with :class:`LoopEvents`)."""
        if self.result is not None:
            return None
        if (prompt := self._prompt_first()) is not None:
            return prompt
        return self._take(*await self._events.get())

    async def next_pieces(self) -> list[str] | None:
        """The next piece and every one that has arrived behind it (a reader that fell behind sends them
        together), or None at the end (a stream opened with :class:`LoopEvents`)."""
        first = await self.next_piece()
        if first is None:
            return None
        pieces = [first]
        while self.result is None and (event := self._events.get_nowait()) is not None:
            piece = self._take(*event)
            if piece is None:
                break
            pieces.append(piece)
        return pieces

    def interrupt(self) -> None:
        """The client left (called in the loop of a stream opened with :class:`LoopEvents`): cancel the row
        and end a reader's wait at once."""
        self._cancel.set()
        self._events.interrupt()

    def close(self) -> None:
        self._cancel.set()
