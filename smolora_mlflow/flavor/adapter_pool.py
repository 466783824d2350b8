"""The live side of an adapter set: one base in memory, PEFT adapters loaded on it, names re-resolved.

:func:`load` builds the ``PeftModel`` (base loaded once, its hash checked; each adapter fetched, checked
and added with ``load_adapter``) and the :class:`AdapterPool` the pyfunc wrapper routes requests with.
peft and transformers are imported inside functions.
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

from smolora_mlflow.errors import invalid_input
from smolora_mlflow.flavor.adapter_set import _fetch
from smolora_mlflow.models import manifest
from smolora_mlflow.models.integrity import VerifiedModel
from smolora_mlflow.models.pretrained import load_causal_lm, quiet_upstream_deprecations

logger = logging.getLogger(__name__)

_MOVABLE = re.compile(r"^models:/[^/@]+(@[^/]+|/(latest|staging|production|archived|none))$", re.IGNORECASE)


@dataclass
class _Loaded:
    uri: str  # pinned URI of the version loaded
    internal: str  # PEFT adapter name
    nbytes: int  # bytes of its weights in memory


def _internal(name: str, serial: int) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) + f"__{serial}"  # PEFT names become module keys: no dots


def _adapter_bytes(model, internal: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{internal}." in n)


class AdapterPool:
    """Public adapter names -> adapters loaded on the one base; swaps happen under ``lock``.

    The wrapper sets ``lock`` to its generation lock, so an adapter is never added, switched or removed
    while a ``generate`` call runs.
    """

    def __init__(self, model, refs: dict[str, str], base_sha256: str | None, refresh_seconds: float,
                 prompt_format: str = "plain"):
        self.model, self.refs, self.base_sha256 = model, dict(refs), base_sha256
        self.prompt_format = prompt_format
        self.refresh_seconds = float(refresh_seconds)
        self.lock = threading.Lock()
        # The adapters rows are being generated with (the wrapper sets it to its scheduler's): one swapped
        # away while in use is deleted by `collect` once its last row has left.
        self.in_use: Callable[[], set[str]] = set
        self.retired: list[str] = []
        self.loaded: dict[str, _Loaded] = {}
        self._serial = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        import mlflow

        self.tracking_uri, self.registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()

    def names(self) -> list[str]:
        return list(self.refs)

    def check_name(self, adapter: Any) -> str:
        if adapter is not None and not isinstance(adapter, str):
            raise invalid_input(
                f"`adapter` must be a string naming an adapter, one of {self.names()}, got {adapter!r:.200}.")
        if adapter in (None, ""):
            raise invalid_input(
                f"This is an adapter set: name the adapter with param `adapter` (or `model` in the OpenAI API), "
                f"one of {self.names()}.")
        if adapter not in self.refs:
            raise invalid_input(
                f"`adapter` is {adapter!r}, which this adapter set does not serve; use one of {self.names()}.")
        return adapter

    def internal(self, name: str) -> str:
        return self.loaded[name].internal

    def add(self, name: str, resolved: VerifiedModel) -> None:
        """Load ``resolved`` (already checked) beside what is loaded, then point ``name`` at it."""
        self._serial += 1
        internal = _internal(name, self._serial)
        data_dir = str(resolved.data_dir)
        with self.lock:
            with quiet_upstream_deprecations():
                self.model.load_adapter(data_dir, adapter_name=internal, is_trainable=False)
            old = self.loaded.get(name)
            self.loaded[name] = _Loaded(resolved.uri, internal, _adapter_bytes(self.model, internal))
            if old is not None:
                self.retired.append(old.internal)
                self.collect(self.in_use())
        if old is not None:
            logger.info("Adapter `%s` now serves %s (was %s).", name, resolved.uri, old.uri)

    def collect(self, in_use: set[str]) -> None:
        """Delete the swapped-away adapters no row uses any more; call holding ``lock``."""
        for internal in [r for r in self.retired if r not in in_use]:
            if internal in self.model.active_adapters:  # requests always name theirs; keep PEFT quiet
                self.model.set_adapter(next(e.internal for e in self.loaded.values()))
            self.model.delete_adapter(internal)
            self.retired.remove(internal)

    def refresh(self) -> list[str]:
        """Re-resolve the references that can move; load what changed. Returns the names switched.

        It reads the tracking and registry stores the set was loaded from, not whatever the process points
        at by the time it runs (a notebook or a test may have moved on to another store).
        """
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri, self.registry_uri)
        changed = []
        for name, uri in self.refs.items():
            if not _MOVABLE.match(uri):
                continue
            try:
                pinned = manifest.resolve(uri, client=client).uri
                if pinned == self.loaded[name].uri:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    resolved = _fetch(name, uri, self.base_sha256, tmp, client=client)
                    _check_format(name, resolved, self.prompt_format)
                    self.add(name, resolved)
                changed.append(name)
            except Exception as e:  # keep serving the version already loaded, and say why
                logger.warning("Adapter `%s` (%s) was not refreshed: %s", name, uri, e)
        return changed

    def start(self) -> None:
        """Refresh every ``refresh_seconds`` in a daemon thread, when some reference can move."""
        if self.refresh_seconds <= 0 or not any(_MOVABLE.match(u) for u in self.refs.values()):
            return

        # The thread holds only a weak reference: once the model is dropped (a notebook cell re-run, a test
        # that is over) the pool goes with it and the thread ends, instead of refreshing for ever.
        pool, stop, every = weakref.ref(self), self._stop, self.refresh_seconds

        def loop() -> None:
            while not stop.wait(every):
                live = pool()
                if live is None:
                    return
                live.refresh()
                del live

        self._thread = threading.Thread(target=loop, name="smolora-adapter-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of each adapter's weights in memory."""
        return {name: entry.nbytes for name, entry in self.loaded.items()}


def _check_format(name: str, resolved: VerifiedModel, prompt_format: str) -> None:
    got = resolved.conf.get("prompt_format") or "plain"
    if got != prompt_format:
        raise MlflowException(
            f"Adapter `{name}` ({resolved.uri}) was trained with prompt format `{got}`, but this adapter set "
            f"renders prompts as `{prompt_format}`; every adapter of a set must share one format.",
            error_code=INVALID_STATE)


def load(vm: VerifiedModel, *, device, torch_dtype, base_model_path: str | None,
         refresh_seconds: float | None = None, hub_kernels: bool = False) -> tuple[Any, Any, AdapterPool]:
    """(PeftModel with every adapter, tokenizer, pool) for an adapter set the integrity gate opened.

    Its references come from the MLmodel, which the gate compared with the hashed ``adapters.json``;
    each adapter is opened through the gate in turn.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    conf, model_root = vm.conf, vm.root
    vm.data_dir  # noqa: B018 - the set's own file hashes, checked before anything else is read
    refs = {str(k): str(v) for k, v in conf["adapters"].items()}
    base_dir = vm.base_dir(base_model_path)
    base = load_causal_lm(base_dir, dtype=torch_dtype, hub_kernels=hub_kernels)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with tempfile.TemporaryDirectory() as tmp:
        base_sha = conf.get("base_model_sha256")
        fetched = {n: _fetch(n, u, base_sha, f"{tmp}/{i}") for i, (n, u) in enumerate(refs.items())}
        prompt_format = conf.get("prompt_format")
        if prompt_format is None:  # a set saved before the format was recorded: its adapters' one format
            formats = {n: r.conf.get("prompt_format") or "plain" for n, r in fetched.items()}
            prompt_format = next(iter(formats.values())) if len(set(formats.values())) == 1 else "plain"
            if len(set(formats.values())) > 1:
                logger.warning("Adapter set `%s` mixes prompt formats %s; rendering every prompt `plain` as "
                               "it was saved. Re-log it with adapters of one format.", model_root, formats)
            conf["prompt_format"] = prompt_format  # what the wrapper renders requests with
        else:
            for name, resolved in fetched.items():
                _check_format(name, resolved, prompt_format)
        first_name = next(iter(fetched))
        first = fetched[first_name]
        with quiet_upstream_deprecations():
            model = PeftModel.from_pretrained(base, str(first.data_dir), adapter_name=_internal(
                first_name, 0), is_trainable=False)
        pool = AdapterPool(model, refs, conf.get("base_model_sha256"),
                           conf.get("refresh_seconds", 30) if refresh_seconds is None else refresh_seconds,
                           prompt_format)
        pool.loaded[first_name] = _Loaded(first.uri, _internal(first_name, 0), _adapter_bytes(model, _internal(
            first_name, 0)))
        for name, resolved in list(fetched.items())[1:]:
            pool.add(name, resolved)
    model = model.to(device).eval()
    return model, tokenizer, pool
