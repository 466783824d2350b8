"""What a reference to a model names: the one parser behind every command and function that takes one.

A reference is a run id, ``runs:/<run_id>[/<path>]``, ``models:/<model_id>`` (an MLflow 3 logged model, also
written ``m-<id>``), ``models:/<name>/<version|stage|latest>``, ``models:/<name>@<alias>``, another artifact
URI, or a local path (an MLflow model folder, a merged or adapter folder, ``smolora:demo``). Stdlib only:
what each kind then resolves to (a version, a logged model, files) is up to the caller.

Example:
    >>> ref = parse_model_ref("models:/reviews@production")
    >>> ref.kind, ref.name, ref.key
    ('registered', 'reviews', 'production')
    >>> parse_model_ref("runs:/0123456789abcdef0123456789abcdef/model").run_id
    '0123456789abcdef0123456789abcdef'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")

RefKind = Literal["run", "logged_model", "registered", "uri", "path"]
MODEL_REF_HELP = ("a run id, runs:/<run_id>/<name>, models:/<model_id>, models:/<name>/<version|stage>, "
                  "models:/<name>@<alias>, an MLflow model folder, a merged model folder, a PEFT adapter folder "
                  "or smolora:demo")


def is_run_id(text: object) -> bool:
    """Whether ``text`` is an MLflow run id (32 lowercase hex digits)."""
    return bool(RUN_ID_RE.fullmatch(str(text)))


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    Attributes:
        text: the reference as given.
        kind: ``run`` (a run id or ``runs:/``), ``logged_model``, ``registered``, ``uri`` or ``path``.
        run_id: the run of a ``run`` reference.
        artifact_path: the path after the run id in ``runs:/<run_id>/<path>``; None for a bare run id.
        model_id: the id of a ``logged_model`` reference.
        name: the registered model of a ``registered`` reference.
        key: its version number, stage, alias or ``latest``.
    """

    text: str
    kind: RefKind
    run_id: str | None = None
    artifact_path: str | None = None
    model_id: str | None = None
    name: str | None = None
    key: str | None = None

    @property
    def is_mlflow(self) -> bool:
        """Whether MLflow resolves it (anything but a local path)."""
        return self.kind != "path"


def traversal(uri: str) -> bool:
    """Whether an artifact URI climbs out of where it points (a ``..`` segment, also written ``%2e%2e`` or
    with backslashes). MLflow folds ``runs:/<id>/../x`` into ``x`` silently; we refuse it instead."""
    if ":/" not in uri:  # not a URI: a local path is the user's own
        return False
    path = uri.split(":", 1)[1]
    return any(".." in {seg.strip() for seg in re.split(r"[/\\]", text)} for text in (path, unquote(path)))


def refuse_traversal(uri: str, field: str = "model URI") -> str:
    """``uri`` unless :func:`traversal` says it leaves its folder; raises INVALID_PARAMETER_VALUE naming it.

    Example:
        >>> refuse_traversal("runs:/0123456789abcdef0123456789abcdef/model/../../secrets")  # doctest: +SKIP
        MlflowException: The model URI 'runs:/.../model/../../secrets' contains '..': ...
    """
    if traversal(uri):
        from smolora_mlflow.errors import invalid_input

        raise invalid_input(f"The {field} {uri!r} contains '..': artifact paths may not leave the run's or "
                            "model's artifacts; name the artifact by its path inside them.")
    return uri


# Version numbers are 32-bit integers in some registry databases (SQLite overflows past 64 bits, and the
# error, "Python int too large to convert", names nothing): a larger one is refused by name.
MAX_VERSION = 2**31 - 1


def _check_version_range(body: str) -> None:
    key = body.partition("/")[2]
    if key.isascii() and key.isdigit() and int(key) > MAX_VERSION:
        from smolora_mlflow.errors import invalid_input

        raise invalid_input(f"Version {key} in 'models:/{body}' is out of range: versions are 1 to {MAX_VERSION}; "
                            "`smolora versions NAME` lists them.")


def parse_model_ref(ref: str | os.PathLike) -> ModelRef:
    """Parse a model reference; never touches MLflow (a bare ``m-<id>`` that exists locally is a path).

    An MLflow reference whose path holds ``..`` is refused (:func:`refuse_traversal`), and so is a version
    number past what a registry holds.
    """
    text = os.fspath(ref) if isinstance(ref, os.PathLike) else str(ref)
    if not os.path.exists(text):  # a local path is the user's own file; only artifact paths are checked
        refuse_traversal(text)
    if is_run_id(text):
        return ModelRef(text, "run", run_id=text)
    if text.startswith("runs:/"):
        run_id, _, path = text.removeprefix("runs:/").strip("/").partition("/")
        return ModelRef(text, "run", run_id=run_id, artifact_path=path or None)
    body = text.removeprefix("models:/")
    if body.startswith("m-") and "/" not in body and (text.startswith("models:/") or not os.path.exists(text)):
        return ModelRef(text, "logged_model", model_id=body)
    if text.startswith("models:/"):
        _check_version_range(body)
        # As MLflow's own parser reads it: <name>/<key> first, else <name>@<alias> at the last "@", so a
        # name holding "@" names the same model here as there.
        name, sep, key = body.partition("/")
        if not sep and "@" in body:
            name, sep, key = body.rpartition("@")
        return ModelRef(text, "registered", name=name, key=key if sep else "latest")
    if "://" in text or text.startswith(("file:", "mlflow-artifacts:")):
        return ModelRef(text, "uri")
    return ModelRef(text, "path")
