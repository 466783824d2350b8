"""All of a registry operation's writes, or none: a journal of what it wrote, undone if a later write fails.

MLflow's registry has no transactions across calls: a transition is a stage write, history tags and
alias moves, each its own request. Operations validate everything first, then write through a
:class:`Journal` opened by :func:`all_or_nothing`; if any write raises, the journal puts back the
stages, tags and aliases it touched as they were when it opened (newest write first) and the error is
raised unchanged. What could not be put back (the store went away mid-way) is logged and noted on the
error, naming each item.

Example:
    >>> with all_or_nothing(client, "reviews-lora") as journal:            # doctest: +SKIP
    ...     journal.transition("3", "Production", archive=True)
    ...     journal.set_alias("production", "3")
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from smolora_mlflow.registry import core

_logger = logging.getLogger(__name__)


class Journal:
    """The writes of one operation on one registered model, and the state they would be undone to."""

    def __init__(self, client: MlflowClient, name: str) -> None:
        self.client, self.name = client, name
        before = core.all_versions(client, name)
        self.stages = {str(mv.version): mv.current_stage or "None" for mv in before}
        self.tags = {str(mv.version): dict(mv.tags) for mv in before}
        self.aliases = {a: str(v) for a, v in core.get_model(client, name).aliases.items()}
        self._undo: list[tuple[str, Callable[[], None]]] = []  # (what, how), in write order

    # --- writes (each records how to undo it before it is sent: a write that fails half-way is undone too)
    def transition(self, version: str, stage: str, *, archive: bool) -> ModelVersion:
        """Move ``version`` to ``stage``; with ``archive``, MLflow also archives the versions holding it."""
        moved = [version] + [v for v, s in self.stages.items() if archive and s == stage and v != version]
        for v in moved:
            self._undo.append((f"stage of version {v}", lambda v=v: self._restore_stage(v)))
        with warnings.catch_warnings():
            # Stages are deprecated upstream but are this package's contract; aliases mirror them.
            warnings.simplefilter("ignore", FutureWarning)
            return self.client.transition_model_version_stage(self.name, version, stage,
                                                              archive_existing_versions=archive)

    def set_tag(self, version: str, key: str, value: str) -> None:
        self._undo.append((f"tag {key} of version {version}", lambda: self._restore_tag(version, key)))
        self.client.set_model_version_tag(self.name, version, key, value)

    def set_alias(self, alias: str, version: str) -> None:
        self._undo.append((f"alias {alias!r}", lambda: self._restore_alias(alias)))
        self.client.set_registered_model_alias(self.name, alias, version)

    def delete_alias(self, alias: str) -> None:
        self._undo.append((f"alias {alias!r}", lambda: self._restore_alias(alias)))
        self.client.delete_registered_model_alias(self.name, alias)

    # --- undo
    def undo(self) -> list[str]:
        """Put back everything written, newest first; returns what could not be put back."""
        failed = []
        for what, how in reversed(self._undo):
            try:
                how()
            except Exception as e:  # keep undoing the rest; the caller reports what is left
                _logger.error("Could not undo the %s of model %r: %s", what, self.name, e)
                failed.append(f"{what} ({e})")
        self._undo.clear()
        return failed

    def _restore_stage(self, version: str) -> None:
        old = self.stages.get(version, "None")
        if (self.client.get_model_version(self.name, version).current_stage or "None") != old:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.client.transition_model_version_stage(self.name, version, old, archive_existing_versions=False)

    def _restore_tag(self, version: str, key: str) -> None:
        old = self.tags.get(version, {}).get(key)
        if old is not None:
            self.client.set_model_version_tag(self.name, version, key, old)
            return
        with _absent_is_fine():
            self.client.delete_model_version_tag(self.name, version, key)

    def _restore_alias(self, alias: str) -> None:
        if (old := self.aliases.get(alias)) is not None:
            self.client.set_registered_model_alias(self.name, alias, old)
            return
        with _absent_is_fine():
            self.client.delete_registered_model_alias(self.name, alias)


@contextlib.contextmanager
def _absent_is_fine() -> Iterator[None]:
    try:
        yield
    except MlflowException as e:
        if not core.has_code(e, RESOURCE_DOES_NOT_EXIST):
            raise


@contextlib.contextmanager
def all_or_nothing(client: MlflowClient, name: str) -> Iterator[Journal]:
    """A :class:`Journal` for ``name``; if the block raises, its writes are undone and the error re-raised."""
    journal = Journal(client, name)
    try:
        yield journal
    except BaseException as e:
        if left := journal.undo():
            e.add_note(f"Model {name!r} may be left part-way: could not undo {'; '.join(left)}.")
        raise
