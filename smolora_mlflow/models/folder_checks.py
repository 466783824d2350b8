"""The checks the integrity gate (:mod:`smolora_mlflow.models.integrity`) runs on a model folder.

Each function checks one thing and raises an ``MlflowException`` (``INVALID_STATE``) naming the file or
MLmodel key, what is wrong and the fix. They are called in one place, :func:`integrity.open_verified`,
except :func:`refuse_escaping_links` and :func:`hash_tree`, which the flavor's save side uses as well (a
link that leaves a folder is refused when a model is saved from it too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE, RESOURCE_DOES_NOT_EXIST

from smolora_mlflow.constants import ADAPTER_SET_REFS_FILE, FLAVOR_NAME
from smolora_mlflow.models import verified
from smolora_mlflow.models.hashing import file_sha256

logger = logging.getLogger(__name__)

FLAVOR_MODULE = "smolora_mlflow.flavor"  # the only python_function loader a smolora model may name
CODE_DIR = "code"  # where save_model ships the package (MLflow's FLAVOR_CONFIG_CODE folder)
PYCACHE = "__pycache__"  # written by Python itself when it imports the shipped code


def _refuse(message: str, code: int = INVALID_STATE) -> MlflowException:
    return MlflowException(message, error_code=code)


def read_mlmodel(model_root: str | Path) -> dict[str, Any]:
    """The parsed MLmodel of a local model folder.

    Parsed with libyaml when it is there: MLflow's ``Model.load`` uses the pure-Python parser, which costs
    several milliseconds per load.
    """
    import yaml

    path = Path(model_root) / "MLmodel"
    if not path.is_file():
        raise _refuse(f"`{model_root}` holds no MLmodel file; it is not an MLflow model.", RESOURCE_DOES_NOT_EXIST)
    with open(path, encoding="utf-8") as f:
        document = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    document = document if isinstance(document, dict) else {}
    if not isinstance(document.get("flavors"), dict):
        document["flavors"] = {}
    return document


def is_smolora(mlmodel: Mapping[str, Any]) -> bool:
    return isinstance(mlmodel["flavors"].get(FLAVOR_NAME), dict)


def require_smolora(root: Path, mlmodel: Mapping[str, Any], recorded: str | None) -> None:
    """The MLmodel holds a ``smolora`` flavor block (``recorded``: who holds a manifest digest for it)."""
    if is_smolora(mlmodel):
        return
    flavors = sorted(mlmodel["flavors"])
    if recorded:
        raise _refuse(f"{recorded} recorded a smolora manifest digest, but the MLmodel at `{root}` has no "
                      f"`flavors.{FLAVOR_NAME}` block (it has {flavors}); the MLmodel was rewritten in the artifact "
                      "store. Refusing to load it: re-log the model from its training run.")
    raise _refuse(f"The model at `{root}` has no `{FLAVOR_NAME}` flavor (it has {flavors}); load it with the "
                  "loader of one of those flavors.", RESOURCE_DOES_NOT_EXIST)


def check_loader(root: Path, flavors: Mapping[str, Any]) -> None:
    """The MLmodel keys that decide what code runs name this package's loader and its shipped folder only.

    MLflow imports ``python_function.loader_module`` and calls its ``_load_pyfunc``; pointed at
    ``mlflow.pyfunc.model`` it unpickles whatever the folder holds. ``code`` is put first on ``sys.path``.
    """
    pyfunc = flavors.get("python_function")
    if not isinstance(pyfunc, dict):
        raise _refuse(f"Model `{root}`: MLmodel key `flavors.python_function` is missing or not a mapping "
                      f"({pyfunc!r:.100}); a smolora model is saved with it. Re-log the model.")
    loader = pyfunc.get("loader_module")
    if loader != FLAVOR_MODULE:
        raise _refuse(f"Model `{root}`: MLmodel key `flavors.python_function.loader_module` is {loader!r}, but a "
                      f"smolora model loads only through `{FLAVOR_MODULE}`; another loader runs other code (a "
                      "pickle, for one). Refusing to load it: re-download or re-log the model.")
    smolora = flavors[FLAVOR_NAME]
    for block, key in (("python_function", "code"), (FLAVOR_NAME, "code")):
        value = flavors[block].get(key)
        if value not in (None, CODE_DIR):
            raise _refuse(f"Model `{root}`: MLmodel key `flavors.{block}.{key}` is {value!r}; smolora models ship "
                          f"their code in `{CODE_DIR}` only. Refusing to load it: re-download or re-log the model.")
    if pyfunc.get("data") != smolora.get("data"):
        raise _refuse(f"Model `{root}`: MLmodel key `flavors.python_function.data` is {pyfunc.get('data')!r} but "
                      f"`flavors.{FLAVOR_NAME}.data` is {smolora.get('data')!r}; the MLmodel was edited. Refusing "
                      "to load it: re-download or re-log the model.")


def check_hash_list(root: Path, conf: Mapping[str, Any]) -> dict[str, str]:
    """The ``file_sha256`` manifest: a non-empty mapping of relative path -> sha256.

    Every smolora format has recorded it (the flavor hashed its files from its first release), so an empty or
    missing list means it was removed, and with it the check for added or changed files.
    """
    hashes = conf.get("file_sha256")
    if not isinstance(hashes, dict) or not hashes or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in hashes.items()):
        raise _refuse(f"Model `{root}`: MLmodel key `flavors.{FLAVOR_NAME}.file_sha256` is {hashes!r:.120}, but "
                      "every smolora model records the sha256 of each of its files there (since the first "
                      "release); without it added or changed files go unnoticed. Refusing to load it: "
                      "re-download or re-log the model.")
    return hashes


def refuse_escaping_links(folder: str | Path, what: str = "Model folder") -> None:
    """Refuse a symbolic link under ``folder`` whose target is outside it (``chat_template.jinja`` ->
    ``/etc/...`` would be read, hashed and served as if it were the model's). Links inside are fine."""
    root = Path(folder).resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            target = path.resolve()
            if target != root and root not in target.parents:
                raise _refuse(f"{what} `{folder}`: `{path.relative_to(root).as_posix()}` is a symbolic link to "
                              f"`{os.readlink(path)}`, outside the folder; its content is not the model's. "
                              "Refusing it: replace the link with the file itself.")


def _files_under(folder: Path, skip_pycache: bool = False) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        if skip_pycache:
            dirnames[:] = [d for d in dirnames if d != PYCACHE]
        out += [(Path(dirpath) / n).relative_to(folder).as_posix() for n in filenames]
    return sorted(out)


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (no ``__pycache__``), keyed by its POSIX path relative to it."""
    return {rel: file_sha256(folder / rel) for rel in _files_under(folder, skip_pycache=True)}


def refuse_unlisted_files(folder: Path, expected: Mapping[str, str], key: str, skip_pycache: bool = False) -> None:
    """Refuse files the manifest does not list (``from_pretrained`` reads an added ``added_tokens.json``;
    Python imports an added module from the code folder)."""
    unlisted = [rel for rel in _files_under(folder, skip_pycache) if rel not in expected]
    if unlisted:
        raise _refuse(f"Model folder `{folder}` holds files its manifest (MLmodel `{key}`) does not list: "
                      f"{unlisted}. They were added after the model was saved and would change what loads. "
                      "Refusing to load it: remove them, or re-download or re-log the model.")


def verify_files(folder: Path, expected: Mapping[str, str]) -> None:
    """Every listed file is there with the recorded sha256 (remembered hashes: :mod:`.verified`)."""
    for rel, sha in expected.items():
        path = folder / rel
        if not path.is_file():
            raise _refuse(f"Model file `{path}` is missing; the model artifact is incomplete. Re-download or "
                          "re-log the model.")
        actual = verified.sha256(path)
        if actual != sha:
            raise _refuse(f"Model file `{path}` does not match the sha256 recorded when the model was saved "
                          f"(expected {sha}, found {actual}); it was truncated or modified. Refusing to load it. "
                          "Re-download or re-log the model.")


def check_code(root: Path, conf: Mapping[str, Any], since_format: int) -> None:
    """The shipped ``code`` folder holds exactly the files hashed at save time (``code_sha256``).

    Models of formats before ``since_format`` recorded no code hashes; their code folder is not checked.
    ``__pycache__`` is skipped: Python writes it when a fresh process imports the shipped code.
    """
    if int(conf.get("format_version") or 1) < since_format:
        return
    expected = conf.get("code_sha256")
    if not isinstance(expected, dict) or not expected:
        raise _refuse(f"Model `{root}`: MLmodel key `flavors.{FLAVOR_NAME}.code_sha256` is {expected!r:.120}; a "
                      f"model of format {conf.get('format_version')} records the sha256 of every file of its code "
                      "folder there. Refusing to load it: re-download or re-log the model.")
    folder = root / CODE_DIR
    refuse_unlisted_files(folder, expected, f"{FLAVOR_NAME}.code_sha256", skip_pycache=True)
    verify_files(folder, expected)


def check_adapter_refs(root: Path, conf: Mapping[str, Any]) -> None:
    """An adapter set's MLmodel ``adapters`` equal the references in its hashed data file.

    Whoever could edit the MLmodel of a set saved before the digest covered it could otherwise point a
    name at another model.
    """
    import json

    refs_file = ADAPTER_SET_REFS_FILE
    path = root / conf["data"] / refs_file
    try:
        refs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _refuse(f"Adapter set `{root}`: its references file `{path}` cannot be read: {e}.") from e
    listed = conf.get("adapters")
    if not isinstance(refs, dict) or refs != listed:
        raise _refuse(f"Adapter set `{root}`: the adapters in MLmodel ({listed!r}) differ from those in its hashed "
                      f"`{conf['data']}/{refs_file}` ({refs!r}); MLmodel was edited after the set was saved. "
                      "Refusing to load it: re-download or re-log the adapter set.")


def check_base_hash(base_dir: Path, conf: Mapping[str, Any]) -> None:
    """An adapter's base weights are the ones it was trained on (``base_model_sha256``)."""
    expected = conf.get("base_model_sha256")
    if not expected:
        logger.warning("No base weights hash recorded for this adapter; %s is not verified.", base_dir)
        return
    actual = verified.weights_sha256(base_dir)
    if actual != expected:
        raise _refuse(
            f"The base model weights at `{base_dir}` have sha256 {actual}, but this adapter was trained "
            f"on `{conf.get('base_model')}` with weights sha256 {expected}. An adapter on other base "
            "weights gives wrong outputs. Fix: point `base_model_path` to the exact base model the "
            "adapter was trained on (same revision), or log the model in merged mode.")
