"""Load and validate training data: local files, hub datasets, in-memory objects and the bundled demo set.

Every source becomes a ``datasets.Dataset`` in one of the three layouts TRL's ``SFTTrainer`` reads:
``text`` (column ``text``), ``prompt_completion`` (``prompt``, ``completion``) or ``chat`` (``messages``,
a list of ``{"role", "content"}`` dicts). Every problem raises :class:`DataError`, whose message names the
source, the column and the config field that fixes it.

Example:
    >>> from smolora_mlflow.config import SmoloraConfig
    >>> data = prepare_data(SmoloraConfig(dataset="smolora:reviews", eval_fraction=0.1))
    >>> data.format, data.num_train, data.num_eval
    ('text', 360, 40)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.data.sources import (  # noqa: F401 - DataError and load_raw are part of this API
    CHAT_ROLES,
    DIGEST_ROWS,
    IN_MEMORY,
    MAX_FIELD_CHARS,
    SUPPORTED_SUFFIXES,
    DataError,
    Format,
    canonical_json,
    dedupe_rows,
    load_raw,
    quote_names,
    require_columns,
    resolve_source,
)
from smolora_mlflow.models.demo import DEMO_CORPUS, is_demo_dataset

if TYPE_CHECKING:
    import datasets
    import mlflow.data.dataset

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Normalised training (and optional evaluation) data, with where it came from.

    Attributes:
        train: rows in TRL's standard columns for ``format``.
        eval: held-out rows in the same columns, or None when ``eval_fraction`` is 0.
        format: ``text``, ``prompt_completion`` or ``chat``.
        source: an absolute path, a hub id, ``smolora:reviews`` or ``<in-memory>``.
        name: a short human name (file stem, hub id, ``smolora-reviews`` or ``in-memory``).
        fingerprint: sha256 hex of the normalised train and eval rows, the same on every machine.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    format: Format
    source: str
    name: str
    fingerprint: str

    @property
    def num_train(self) -> int:
        return self.train.num_rows

    @property
    def num_eval(self) -> int:
        return 0 if self.eval is None else self.eval.num_rows


# ----------------------------------------------------------------------------------------------------
# normalising


def prepare_data(cfg: SmoloraConfig, dataset: Any = None) -> PreparedData:
    """Load, validate, normalise and split the training data of a run.

    Args:
        cfg: the run config (``dataset``, ``dataset_format``, the ``*_field`` names, ``chunk_words``,
            ``dedupe``, ``max_samples``, ``eval_fraction`` and ``seed`` are read).
        dataset: an in-memory dataset (or a path) that overrides ``cfg.dataset``.

    Raises:
        DataError: the data cannot be read, lacks a column, has no non-empty rows or bad chat roles.

    Example:
        >>> data = prepare_data(SmoloraConfig(), [{"prompt": "Hi", "completion": " there"}])
        >>> data.format, data.train[0]
        ('prompt_completion', {'prompt': 'Hi', 'completion': ' there'})
    """
    obj = cfg.dataset if dataset is None else dataset
    src = resolve_source(obj)
    raw = load_raw(obj, split=cfg.dataset_split, chunk_words=cfg.chunk_words, text_field=cfg.text_field)
    fmt = detect_format(raw.column_names, cfg, src.source)
    columns = _columns_for(fmt, cfg)
    require_columns(raw, src.source, columns, fmt)
    rows, empty = _normalise(raw, fmt, columns, src.source)
    if empty:
        logger.warning("Dropped %d empty or whitespace-only row(s) of %s.", empty, src.source)
    if cfg.dedupe:
        rows, dropped = dedupe_rows(rows)
        logger.info("Dropped %d duplicate example(s) of %s.", dropped, src.source)
    if not rows:
        raise DataError(
            f"dataset `{src.source}` has no non-empty examples: all {raw.num_rows} row(s) are empty in "
            f"column(s) {quote_names(c for _, c in columns.values())}; check `{next(iter(columns.values()))[0]}`."
        )
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    train_rows, eval_rows = _split(rows, cfg.eval_fraction, cfg.seed, src.source)
    logger.info("Prepared %s data: %d train, %d eval row(s).", fmt, len(train_rows), len(eval_rows))
    return PreparedData(
        train=_to_dataset(train_rows, fmt, "train"),
        eval=_to_dataset(eval_rows, fmt, "eval") if eval_rows else None,
        format=fmt,
        source=src.source,
        name=src.name,
        fingerprint=_fingerprint(train_rows, eval_rows),
    )


def as_chat(data: PreparedData) -> PreparedData:
    """``data`` with prompt/completion rows as chat turns (TRL's conversational prompt-completion), so
    training renders them with the tokenizer's chat template; other formats are returned as they are.

    The fingerprint and the format name stay: the rows are the same data, rendered differently (the run
    records how in its ``prompt_format`` param and ``smolora.prompt_format`` tag).
    """
    from smolora_mlflow.models.generation import chat_messages

    if data.format != "prompt_completion":
        return data

    def turns(row: dict[str, str]) -> dict[str, Any]:
        user, assistant = chat_messages(row["prompt"], row["completion"])
        return {"prompt": [user], "completion": [assistant]}

    def convert(ds):
        return None if ds is None else datasets_from_list([turns(r) for r in ds.to_list()], ds.split)

    return dataclasses.replace(data, train=convert(data.train), eval=convert(data.eval))


def datasets_from_list(rows: list[dict[str, Any]], split: Any) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_list(rows, split=split)


def detect_format(columns: list[str], cfg: SmoloraConfig, where: str = IN_MEMORY) -> Format:
    """``cfg.dataset_format``, or for ``auto`` the first layout whose configured columns all exist."""
    if cfg.dataset_format != "auto":
        return cfg.dataset_format
    if cfg.messages_field in columns:
        return "chat"
    if cfg.prompt_field in columns and cfg.completion_field in columns:
        return "prompt_completion"
    if cfg.text_field in columns:
        return "text"
    raise DataError(
        f"cannot detect the format of dataset `{where}` from its columns {quote_names(columns)}: expected "
        f"`{cfg.messages_field}` (chat; set `messages_field`), `{cfg.prompt_field}` + "
        f"`{cfg.completion_field}` (set `prompt_field` and `completion_field`) or `{cfg.text_field}` "
        "(set `text_field`)."
    )


def _columns_for(fmt: Format, cfg: SmoloraConfig) -> dict[str, tuple[str, str]]:
    """Standard column -> (config field, user column)."""
    if fmt == "chat":
        return {"messages": ("messages_field", cfg.messages_field)}
    if fmt == "prompt_completion":
        return {
            "prompt": ("prompt_field", cfg.prompt_field),
            "completion": ("completion_field", cfg.completion_field),
        }
    return {"text": ("text_field", cfg.text_field)}


def _normalise(
    raw: datasets.Dataset, fmt: Format, columns: dict[str, tuple[str, str]], where: str
) -> tuple[list[dict[str, Any]], int]:
    table = raw.select_columns(list(dict.fromkeys(c for _, c in columns.values()))).to_dict()
    rows: list[dict[str, Any]] = []
    empty = 0
    for i in range(raw.num_rows):
        row: dict[str, Any] = {}
        for std, (_, column) in columns.items():
            value = table[column][i]
            if fmt == "chat":
                row[std] = _messages(value, i, column, where)
            else:
                row[std] = _string(value, f"row {i} of `{where}`: column `{column}`")
        # A chat is empty when no message says anything; a prompt/completion pair when either half is.
        if fmt == "chat":
            is_empty = not any(m["content"].strip() for m in row["messages"])
        else:
            is_empty = any(not v.strip() for v in row.values())
        empty += is_empty
        if not is_empty:
            rows.append(row)
    return rows, empty


def _string(value: Any, what: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise DataError(f"{what} must hold text, got {type(value).__name__} {value!r:.60}; store a string.")
    if len(value) > MAX_FIELD_CHARS:
        raise DataError(
            f"{what} holds {len(value):,} characters, over the limit of {MAX_FIELD_CHARS:,}; split it "
            "(e.g. with `chunk_words`) or remove that row."
        )
    return value


def _messages(value: Any, i: int, column: str, where: str) -> list[dict[str, str]]:
    what = f"row {i} of `{where}`: column `{column}`"
    if isinstance(value, str):  # chats stored as JSON text, e.g. in a CSV cell
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{what} is text but not a JSON list of messages ({e.msg}).") from e
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f'{what} must be a list of {{"role", "content"}} dicts, got {type(value).__name__}.')
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise DataError(
                f'{what}: message {j} must be a dict with "role" and "content", got {message!r:.60}'
            )
        role = message["role"]
        if role not in CHAT_ROLES:
            raise DataError(
                f"{what}: message {j} has role {role!r}; allowed roles are {quote_names(CHAT_ROLES)}. Rename it "
                "(e.g. `human` -> `user`, `gpt` -> `assistant`)."
            )
        out.append({"role": role, "content": _string(message["content"], f"{what}: message {j} content")})
    return out


def _split(
    rows: list[dict[str, Any]], fraction: float, seed: int, where: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if fraction <= 0:
        return rows, []
    n_eval = max(1, round(len(rows) * fraction))
    if len(rows) - n_eval < 1:
        raise DataError(
            f"`eval_fraction` = {fraction} holds out {n_eval} of the {len(rows)} row(s) of `{where}`, "
            "leaving no training rows; set `eval_fraction` to 0 or add data."
        )
    # random.Random(int).shuffle is the same on every platform and Python version since 3.2.
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _to_dataset(rows: list[dict[str, Any]], fmt: Format, split: str) -> datasets.Dataset:
    import datasets

    string = datasets.Value("string")
    features = {
        "text": {"text": string},
        "prompt_completion": {"prompt": string, "completion": string},
        "chat": {"messages": datasets.List({"role": string, "content": string})},
    }[fmt]
    return datasets.Dataset.from_list(rows, datasets.Features(features), split=datasets.NamedSplit(split))


def _fingerprint(train_rows: Iterable[Any], eval_rows: Iterable[Any]) -> str:
    # One canonical JSON object per line; JSON never holds a raw newline, so the separator is unambiguous.
    h = hashlib.sha256()
    for part, rows in enumerate((train_rows, eval_rows)):
        if part:
            h.update(b"\x1e\n")
        for row in rows:
            h.update(canonical_json(row) + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# MLflow


def mlflow_dataset(ds: datasets.Dataset, *, source: str, name: str) -> mlflow.data.dataset.Dataset:
    """Wrap ``ds`` as an MLflow dataset for ``mlflow.log_input``; never downloads anything.

    Args:
        ds: the (normalised) rows to describe.
        source: ``PreparedData.source``: a local path, a hub id, ``smolora:reviews`` or ``<in-memory>``.
        name: the name shown in the MLflow UI.

    Returns:
        A dataset with a name, a source, a digest (sha256 of the first 10,000 canonical rows and the row
        count), a schema and a profile holding the row count.

    Example:
        >>> import mlflow
        >>> data = prepare_data(SmoloraConfig())
        >>> with mlflow.start_run():  # doctest: +SKIP
        ...     mlflow.log_input(mlflow_dataset(data.train, source=data.source, name=data.name), "training")
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset import from_huggingface

    head = ds.select(range(min(ds.num_rows, DIGEST_ROWS))).to_list()
    digest = _fingerprint(head, [{"num_rows": ds.num_rows, "columns": ds.column_names}])[:16]
    if source == IN_MEMORY:
        return from_huggingface(ds, name=name, digest=digest)  # a code source: the run's notebook/script
    path = DEMO_CORPUS if is_demo_dataset(source) else Path(source)
    if path.exists():
        with warnings.catch_warnings():
            # MLflow registers its local-file source under two schemes and warns that the two match.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            local = resolve_dataset_source(str(path))
        return from_huggingface(ds, source=local, name=name, digest=digest)
    # A hub source only records the id; MLflow loads nothing until someone calls source.load().
    return from_huggingface(ds, path=source, name=name, digest=digest)
