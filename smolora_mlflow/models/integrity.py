"""The integrity gate: every load of a smolora model resolves, downloads and checks it here, once.

:func:`open_verified` takes a model URI (``models:/``, ``runs:/``, any artifact URI) or a local folder and
returns a :class:`VerifiedModel`: a local folder whose checks have passed, with the ``smolora`` block to
load it by. Every load path calls it exactly once:

- ``smolora_mlflow.flavor.load_model`` (native objects) and ``_load_pyfunc`` (``mlflow.pyfunc.load_model``,
  ``mlflow models serve``, the ``smolora serve`` server process);
- each adapter of an adapter set, at save, load and refresh (``flavor/adapter_set.py``);
- ``smolora serve``'s launcher, before the server starts (``serving/launcher.py``);
- ``registry.load`` (which hands the verified folder to ``mlflow.pyfunc.load_model``: see
  :func:`handed_to_loader`);
- evaluation (``evaluation/loading.py``).

The checks, in the order they run (their names are what :attr:`VerifiedModel.checks` lists):

1. ``mlmodel``: the folder has an MLmodel with a ``smolora`` block.
2. ``loader``: ``python_function.loader_module`` is ``smolora_mlflow.flavor`` and the code and data keys
   name the model's own folders (another loader runs other code: a pickle, for one).
3. ``digest``: the manifest digest equals the one on record (:mod:`.manifest`): the registered version's
   or run's or LoggedModel's for ``models:/`` and ``runs:/``; the one ``smolora serve`` looked up, in its
   server; for a plain folder, best effort, the LoggedModel its MLmodel names.
4. ``hash-list``: ``file_sha256`` lists every file with its sha256 (an empty or missing list is refused).
5. ``links``: no symbolic link in the folder points outside it.
6. ``unlisted``: the data folder holds no file the manifest does not list.
7. ``code``: the shipped ``code`` folder holds exactly the files hashed at save time (format 2 on).
8. ``adapter-refs``: an adapter set's MLmodel references equal those in its hashed data file.
9. ``files``: each data file has its recorded sha256 (with ``defer_file_hashes``, while the caller reads
   the files: :meth:`VerifiedModel.read_data`).
10. ``base`` (adapter modes, when the caller asks for the base): the base weights' sha256.

Example:
    >>> vm = open_verified("models:/reviews@production")                      # doctest: +SKIP
    >>> vm.uri, vm.checks[:3]                                                  # doctest: +SKIP
    ('models:/reviews/3', ['mlmodel', 'loader', 'digest'])
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from smolora_mlflow.constants import ADAPTER_SET_MODE, FLAVOR_NAME
from smolora_mlflow.models import folder_checks as checks
from smolora_mlflow.models import manifest

logger = logging.getLogger(__name__)

ENV_DIGEST = "SMOLORA_MANIFEST_SHA256"  # set by `smolora serve` for the server process
ENV_SOURCE = "SMOLORA_MANIFEST_SOURCE"  # what recorded that digest, for the error message
T = TypeVar("T")

_observers: list[list[str]] = []
_observers_lock = threading.Lock()
_handed: contextvars.ContextVar[VerifiedModel | None] = contextvars.ContextVar("smolora_verified", default=None)


@dataclass
class VerifiedModel:
    """A local model folder that passed the gate, and what it was checked against."""

    root: Path
    mlmodel: dict[str, Any]
    expected: manifest.Expected
    checks: list[str] = field(default_factory=list)
    _files_pending: bool = False

    @property
    def is_smolora(self) -> bool:
        """False only for another flavor's model opened with ``other_flavors=True`` (then nothing is checked)."""
        return checks.is_smolora(self.mlmodel)

    @property
    def flavors(self) -> dict[str, Any]:
        return self.mlmodel["flavors"]

    @property
    def conf(self) -> dict[str, Any]:
        """The ``smolora`` block of the MLmodel."""
        return self.flavors[FLAVOR_NAME]

    @property
    def uri(self) -> str:
        """The source, pinned (``models:/name@alias`` -> ``models:/name/<version>``)."""
        return self.expected.uri

    @property
    def data_dir(self) -> Path:
        """The data folder; its files are hashed first if that was deferred and not done yet."""
        if self._files_pending:
            self._verify_files()
        return self.root / self.conf["data"]

    def _verify_files(self) -> None:
        checks.verify_files(self.root / self.conf["data"], self.conf["file_sha256"])
        self._files_pending = False
        self.checks.append("files")

    def read_data(self, read: Callable[[Path], T]) -> T:
        """``read(data_dir)``, with the deferred file hashes computed meanwhile; nothing is returned before
        they match. The reader must run no code from the files (safetensors and JSON do not): it may parse
        a tampered file, but what it made is thrown away. Hashing while reading saves a second pass over
        the weights (hashlib and safetensors both release the GIL)."""
        if not self._files_pending:
            return read(self.data_dir)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolora-verify") as pool:
            hashed = pool.submit(self._verify_files)
            try:
                result = read(self.root / self.conf["data"])
            finally:
                hashed.result()
        return result

    def base_dir(self, base_model_path: str | None = None) -> Path:
        """The local folder of an adapter's (or adapter set's) base, its weights' sha256 checked."""
        from smolora_mlflow.models.pretrained import locate_base

        base = locate_base(self.conf, base_model_path)
        checks.check_base_hash(base, self.conf)
        self.checks.append("base")
        return base


@contextlib.contextmanager
def observe() -> Iterator[list[str]]:
    """The source of every gate run in this process while the block runs, in order (tests and audits)."""
    seen: list[str] = []
    with _observers_lock:
        _observers.append(seen)
    try:
        yield seen
    finally:
        with _observers_lock:
            _observers.remove(seen)


@contextlib.contextmanager
def handed_to_loader(vm: VerifiedModel) -> Iterator[None]:
    """While the block runs, a gate call on ``vm.root`` in this context returns ``vm`` without checking again.

    ``registry.load`` checks a version, then gives the folder to ``mlflow.pyfunc.load_model``, which calls the
    flavor's ``_load_pyfunc``, which calls the gate: the folder was checked a moment ago by this process.
    It cannot be the other way round: MLflow imports the MLmodel's loader before ``_load_pyfunc`` runs.
    """
    token = _handed.set(vm)
    try:
        yield
    finally:
        _handed.reset(token)


def open_verified(source: str | os.PathLike, client: Any = None, *, dst_path: str | None = None,
                  defer_file_hashes: bool = False, other_flavors: bool = False) -> VerifiedModel:
    """Resolve, download and check a smolora model; see the module docstring for the checks.

    Args:
        source: ``models:/name@alias``, ``models:/name/3``, ``models:/<model_id>``, ``runs:/<id>/model``,
            another artifact URI, or a local model folder (checked in place).
        client: an ``MlflowClient`` naming the tracking and registry stores to resolve and download from;
            default: the current ones.
        dst_path: where to download to (default: a new temporary folder).
        defer_file_hashes: leave the data files' hashes to :meth:`VerifiedModel.read_data` (or the first
            use of ``data_dir``), so they are computed while the caller reads the files.
        other_flavors: return an MLflow model without a ``smolora`` flavor unchecked (``registry.load``
            loads any pyfunc model, as MLflow would), unless a manifest digest is on record for it (then it
            was logged as a smolora model and lost its block). Default: refused.

    Raises:
        MlflowException: ``INVALID_STATE`` naming the file or MLmodel key that failed a check.
    """
    handed = _handed.get()
    if handed is not None and _is_local(source) and Path(source).resolve() == handed.root.resolve():
        return handed
    expected = manifest.resolve(str(source), client=client)
    root = _download(str(source), expected, client, dst_path)
    with _observers_lock:
        for seen in _observers:
            seen.append(str(source))
    vm = VerifiedModel(root, checks.read_mlmodel(root), expected, ["mlmodel"])
    if other_flavors and not checks.is_smolora(vm.mlmodel) and not expected.digest:
        return vm
    checks.require_smolora(root, vm.mlmodel, expected.source if expected.digest else None)
    _check(vm, defer_file_hashes)
    return vm


def _is_local(source: str | os.PathLike) -> bool:
    text = str(source)
    return not text.startswith(("models:/", "runs:/")) and os.path.isdir(text)


def _download(source: str, expected: manifest.Expected, client: Any, dst_path: str | None) -> Path:
    if dst_path is None and _is_local(source):
        return Path(source).resolve()
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    uri, stores = expected.uri, {}
    if client is not None:
        # MLflow resolves a models:/ URI with the process-wide registry URI, whatever it is given, so the
        # version's files are looked up here with ``client`` and downloaded from where they live.
        uri = _storage_uri(client, expected.uri)
        stores = {"tracking_uri": client.tracking_uri, "registry_uri": client._registry_uri}
    if dst_path:
        os.makedirs(dst_path, exist_ok=True)
    return Path(_download_artifact_from_uri(artifact_uri=uri, output_path=dst_path, **stores)).resolve()


def _storage_uri(client: Any, uri: str) -> str:
    """Where the files of a pinned ``models:/name/N`` or ``models:/<model_id>`` live; other URIs as they are."""
    if not uri.startswith("models:/"):
        return uri
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    found = get_model_name_and_version(client, uri)
    if len(found) == 1:
        return client.get_logged_model(found[0]).artifact_location
    return client.get_model_version_download_uri(*found)


def _check(vm: VerifiedModel, defer_file_hashes: bool) -> None:
    """Checks 2-9 of the module docstring, in that order."""
    root, conf = vm.root, vm.conf
    checks.check_loader(root, vm.flavors)
    vm.checks.append("loader")
    expected = vm.expected if vm.expected.source is not None else _recorded_for_folder(vm.mlmodel)
    manifest.check(vm.flavors, expected)
    vm.checks.append("digest")
    hashes = checks.check_hash_list(root, conf)
    vm.checks.append("hash-list")
    checks.refuse_escaping_links(root)
    vm.checks.append("links")
    checks.refuse_unlisted_files(root / conf["data"], hashes, f"{FLAVOR_NAME}.file_sha256")
    vm.checks.append("unlisted")
    checks.check_code(root, conf, since_format=2)
    vm.checks.append("code")
    if conf.get("mode") == ADAPTER_SET_MODE:
        checks.check_adapter_refs(root, conf)
        vm.checks.append("adapter-refs")
    vm._files_pending = True
    if not defer_file_hashes:
        vm._verify_files()


def _recorded_for_folder(mlmodel: dict[str, Any]) -> manifest.Expected:
    """What a plain folder is compared with: the digest ``smolora serve`` looked up (in its server), else,
    best effort, the LoggedModel the MLmodel names when a tracking URI is set and knows it.

    Best effort because an MLmodel whose ``model_id`` was removed, or a store that does not know it, gives
    nothing to compare with (load by ``models:/`` or ``runs:/`` URI to check strictly).
    """
    if value := os.environ.get(ENV_DIGEST):
        return manifest.Expected("", value, os.environ.get(ENV_SOURCE) or "the served model")
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    model_id = mlmodel.get("model_id")
    if not model_id or not is_tracking_uri_set():
        return manifest.Expected("", None, None)
    import mlflow

    try:
        value = mlflow.MlflowClient().get_logged_model(model_id).tags.get(manifest.TAG)
    except Exception as e:  # another store, or none reachable: nothing on record to compare with
        logger.debug("no LoggedModel %s to compare the manifest with: %s", model_id, e)
        return manifest.Expected("", None, None)
    return manifest.Expected("", value, f"logged model {model_id}") if value else manifest.Expected("", None, None)
