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

import hashlib
import io
import json
import logging
import math
import random
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from smolora_mlflow.config import DEMO_DATASET, SmoloraConfig
from smolora_mlflow.demo import DEMO_CORPUS, is_demo_dataset

if TYPE_CHECKING:
    import datasets
    import mlflow.data.dataset

logger = logging.getLogger(__name__)

Format = Literal["text", "prompt_completion", "chat"]
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
CHAT_ROLES = ("system", "user", "assistant")
MAX_FIELD_CHARS = 1_000_000
IN_MEMORY = "<in-memory>"
DIGEST_ROWS = 10_000  # like MLflow's own digests: hash a bounded prefix plus the row count
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_EXTENSION = re.compile(r"\.[A-Za-z]{2,5}")  # `.xlsx`, `.tsv`; not the `.v2` of `org/set.v2`
_SUPPORTED_TEXT = ", ".join(SUPPORTED_SUFFIXES) + " (or a folder of .txt files)"


class DataError(ValueError):
    """A dataset that cannot be loaded or used; the message says which source, column and fix."""


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


@dataclass(frozen=True)
class _Source:
    kind: Literal["demo", "file", "folder", "hub", "memory"]
    source: str
    name: str
    path: Path | None = None


# ----------------------------------------------------------------------------------------------------
# loading


def load_raw(
    source: Any,
    *,
    split: str = "train",
    revision: str | None = None,
    chunk_words: int = 0,
    dedupe: bool = False,
    text_field: str = "text",
) -> datasets.Dataset:
    """Load a dataset as it is stored, with its own columns.

    Args:
        source: a path (.jsonl, .json, .csv, .parquet, .txt or a folder of .txt files), a hub id,
            ``smolora:reviews``, a ``datasets.Dataset``/``DatasetDict``, a pandas DataFrame, or a list of
            strings or of dicts.
        split: split of a hub dataset or ``DatasetDict``.
        revision: hub revision (branch, tag or commit).
        chunk_words: when > 0, split the ``text_field`` of each row into chunks of this many words.
        dedupe: drop rows equal to an earlier row (all columns), keeping order.
        text_field: column that receives the lines of .txt files and lists of strings.

    Raises:
        DataError: the source is missing, unreadable, has no rows or is of an unsupported kind.

    Example:
        >>> load_raw(["a b c d", "e"], chunk_words=2)["text"][:]
        ['a b', 'c d', 'e']
    """
    src = _resolve_source(source)
    ds = _load(src, source, split=split, revision=revision, text_field=text_field)
    if ds.num_rows == 0:
        raise DataError(f"dataset `{src.source}` has no rows; add examples or point `dataset` elsewhere.")
    if chunk_words < 0:
        raise DataError(f"`chunk_words` must be >= 0, got {chunk_words}; use 0 to keep lines whole.")
    if chunk_words > 0:
        ds = _chunk(ds, chunk_words, text_field, src.source)
    if dedupe:
        rows, dropped = _dedupe(ds.to_list())
        logger.info("Dropped %d duplicate row(s) of %s.", dropped, src.source)
        ds = _from_rows(rows, src.source)
    logger.info("Loaded %d row(s) with columns %s from %s.", ds.num_rows, ds.column_names, src.source)
    return ds


def _resolve_source(source: Any) -> _Source:
    if not isinstance(source, (str, Path)):
        return _Source("memory", IN_MEMORY, "in-memory")
    text = str(source).strip()
    if not text:
        raise DataError(f"`dataset` must not be empty; pass a file, a folder, a hub id or `{DEMO_DATASET}`.")
    if is_demo_dataset(text):
        return _Source("demo", DEMO_DATASET, "smolora-reviews", DEMO_CORPUS)
    if text.startswith("smolora:"):
        raise DataError(f"`dataset` = {text!r} is not built in; the bundled dataset is `{DEMO_DATASET}`.")
    path = Path(text).expanduser()
    if path.is_dir():
        path = path.resolve()
        return _Source("folder", str(path), path.name, path)
    if path.is_file():
        path = path.resolve()
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(
                f"dataset file `{path}` has extension `{path.suffix}`, which smolora cannot read; "
                f"supported formats: {_SUPPORTED_TEXT}. Convert it (e.g. save as .csv or .jsonl)."
            )
        return _Source("file", str(path), path.stem, path)
    if _looks_like_path(text):
        raise DataError(
            f"dataset file `{path.resolve()}` not found (`dataset` = {text!r}); check the path "
            f"(relative paths start at {Path.cwd()})."
        )
    if _HUB_ID.fullmatch(text):
        return _Source("hub", text, text)
    raise DataError(
        f"`dataset` = {text!r} is neither an existing path nor a hub id like `org/name`; pass a local "
        f"file ({_SUPPORTED_TEXT}), a hub id, or `{DEMO_DATASET}`."
    )


def _looks_like_path(text: str) -> bool:
    suffix = Path(text).suffix
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or suffix.lower() in SUPPORTED_SUFFIXES
        or bool(_FILE_EXTENSION.fullmatch(suffix))
    )


def _load(src: _Source, obj: Any, *, split: str, revision: str | None, text_field: str) -> datasets.Dataset:
    if src.kind == "memory":
        return _from_object(obj, split, text_field)
    if src.kind == "hub":
        return _from_hub(src.source, split, revision)
    assert src.path is not None
    files = [src.path]
    if src.kind == "folder":
        files = sorted(p for p in src.path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise DataError(f"dataset folder `{src.path}` holds no .txt files; add some or pass a file.")
    suffix = src.path.suffix.lower()
    if src.kind == "folder" or suffix == ".txt":  # one example per non-empty line, as SmoLoRA does
        lines = [s for f in files for line in _read_text(f).splitlines() if (s := line.strip())]
        return _from_columns({text_field: lines}, src.source)
    if suffix == ".parquet":
        return _read_parquet(src.path)
    text = _read_text(src.path)
    if suffix == ".csv":
        return _read_csv(text, src.source)
    if suffix == ".json":
        return _read_json(text, src.source)
    return _from_rows(_read_jsonl(text, src.source), src.source)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"dataset file `{path}` is not valid UTF-8 (byte {e.start}: {e.reason}); re-save it as UTF-8."
        ) from e


def _read_csv(text: str, where: str) -> datasets.Dataset:
    import pandas as pd

    if not text.strip():
        return _from_columns({}, where)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as e:
        raise DataError(f"dataset file `{where}` is not valid CSV ({e}); fix its quoting.") from e
    return _from_columns({str(c): df[c].tolist() for c in df.columns}, where)


def _read_jsonl(text: str, where: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"`{where}` line {number} is not valid JSON ({e.msg}); fix that line.") from e
            if not isinstance(row, dict):
                raise DataError(f"`{where}` line {number} holds a {type(row).__name__}, not a JSON object.")
            rows.append(row)
    return rows


def _read_json(text: str, where: str) -> datasets.Dataset:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json extension
            return _from_rows(_read_jsonl(text, where), where)
        raise DataError(f"`{where}` is not valid JSON ({e.msg} at line {e.lineno}); fix the file.") from e
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return _from_rows(data, where)
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return _from_columns(data, where)
    raise DataError(f"`{where}` must hold a list of objects (one per example) or an object of column lists.")


def _read_parquet(path: Path) -> datasets.Dataset:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return datasets.Dataset(pq.read_table(path))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"dataset file `{path}` is not a readable Parquet file ({e}); re-export it.") from e


def _from_object(obj: Any, split: str, text_field: str) -> datasets.Dataset:
    import datasets
    import pandas as pd
    import pyarrow as pa

    if isinstance(obj, datasets.Dataset):
        return obj
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"DatasetDict has no split `{split}`, only {_names(obj)}; set `dataset_split`.")
        return obj[split]
    if isinstance(obj, pd.DataFrame):
        try:  # from_pandas turns NaN into null, which a plain list of values would not
            return datasets.Dataset.from_pandas(obj.rename(columns=str), preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise DataError(f"DataFrame cannot become a dataset ({e}); use one type per column.") from e
    if isinstance(obj, (list, tuple)):
        if all(isinstance(r, str) for r in obj):
            return _from_columns({text_field: list(obj)}, IN_MEMORY)
        if all(isinstance(r, Mapping) for r in obj):
            return _from_rows([dict(r) for r in obj], IN_MEMORY)
        raise DataError("an in-memory dataset list must hold only strings or only dicts; got a mix.")
    raise DataError(
        f"cannot use a {type(obj).__name__} as a dataset; pass a path, a hub id, `{DEMO_DATASET}`, a "
        "datasets.Dataset, a pandas DataFrame, or a list of strings or dicts."
    )


def _from_hub(hub_id: str, split: str, revision: str | None) -> datasets.Dataset:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=split, revision=revision)
    except Exception as e:  # offline, unknown id, gated, bad split: all mean this id cannot be used
        raise DataError(
            f"dataset `{hub_id}` is neither a local path nor reachable on the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Pass a local file ({_SUPPORTED_TEXT}) instead, or check the id, "
            "`dataset_split` and the network."
        ) from e
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"hub dataset `{hub_id}` loaded as a {type(ds).__name__}; set `dataset_split`.")
    return ds


def _from_rows(rows: list[dict[str, Any]], where: str) -> datasets.Dataset:
    # Union of keys in first-seen order: datasets' from_list would keep only the first row's keys.
    keys = dict.fromkeys(k for row in rows for k in row)
    return _from_columns({str(k): [row.get(k) for row in rows] for k in keys}, where)


def _from_columns(columns: Mapping[str, list[Any]], where: str) -> datasets.Dataset:
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_dict(dict(columns))
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise DataError(
            f"dataset `{where}` has a column with values of mixed types ({e}); make every row use the same "
            "type in each column (e.g. all strings)."
        ) from e


def _chunk(ds: datasets.Dataset, chunk_words: int, text_field: str, where: str) -> datasets.Dataset:
    _require_columns(ds, where, {"text": ("text_field", text_field)}, "text")
    rows: list[dict[str, Any]] = []
    for row in ds.to_list():
        words = str(row[text_field] or "").split()
        for i in range(0, len(words), chunk_words):
            rows.append({**row, text_field: " ".join(words[i : i + chunk_words])})
    return _from_rows(rows, where)


def _dedupe(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    seen: set[bytes] = set()
    kept = []
    for row in rows:
        key = _canonical(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


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
    src = _resolve_source(obj)
    raw = load_raw(obj, split=cfg.dataset_split, chunk_words=cfg.chunk_words, text_field=cfg.text_field)
    fmt = detect_format(raw.column_names, cfg, src.source)
    columns = _columns_for(fmt, cfg)
    _require_columns(raw, src.source, columns, fmt)
    rows, empty = _normalise(raw, fmt, columns, src.source)
    if empty:
        logger.warning("Dropped %d empty or whitespace-only row(s) of %s.", empty, src.source)
    if cfg.dedupe:
        rows, dropped = _dedupe(rows)
        logger.info("Dropped %d duplicate example(s) of %s.", dropped, src.source)
    if not rows:
        raise DataError(
            f"dataset `{src.source}` has no non-empty examples: all {raw.num_rows} row(s) are empty in "
            f"column(s) {_names(c for _, c in columns.values())}; check `{next(iter(columns.values()))[0]}`."
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
        f"cannot detect the format of dataset `{where}` from its columns {_names(columns)}: expected "
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


def _require_columns(ds: datasets.Dataset, where: str, columns: dict[str, tuple[str, str]], fmt: str) -> None:
    for field_name, column in columns.values():
        if column not in ds.column_names:
            raise DataError(
                f"dataset `{where}` has no column `{column}` (needed for the {fmt} format); its columns are "
                f"{_names(ds.column_names)}. Set `{field_name}` to the column that holds it"
                " (or `dataset_format` to another format)."
            )


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
                f"{what}: message {j} has role {role!r}; allowed roles are {_names(CHAT_ROLES)}. Rename it "
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


def _canonical(row: Any) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def _fingerprint(train_rows: Iterable[Any], eval_rows: Iterable[Any]) -> str:
    # One canonical JSON object per line; JSON never holds a raw newline, so the separator is unambiguous.
    h = hashlib.sha256()
    for part, rows in enumerate((train_rows, eval_rows)):
        if part:
            h.update(b"\x1e\n")
        for row in rows:
            h.update(_canonical(row) + b"\n")
    return h.hexdigest()


def _names(columns: Iterable[str]) -> str:
    return ", ".join(f"`{c}`" for c in columns) or "(none)"


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
