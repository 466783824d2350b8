"""Where training data comes from: local files, folders of text, hub datasets, in-memory objects, the demo set.

``load_raw`` turns any source into a ``datasets.Dataset`` with the source's own columns; ``data`` then
normalises it for TRL. Every problem raises :class:`DataError`, naming the source, the column and the fix.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from smolora_mlflow.config import DEMO_DATASET
from smolora_mlflow.models.demo import DEMO_CORPUS, is_demo_dataset

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

Format = Literal["text", "prompt_completion", "chat", "preference", "unpaired_preference", "prompt_only"]
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


@dataclass(frozen=True)
class _Source:
    kind: Literal["demo", "file", "folder", "hub", "memory"]
    source: str
    name: str
    path: Path | None = None


def load_raw(
    source: Any,
    *,
    split: str = "train",
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
        chunk_words: when > 0, split the ``text_field`` of each row into chunks of this many words.
        dedupe: drop rows equal to an earlier row (all columns), keeping order.
        text_field: column that receives the lines of .txt files and lists of strings.

    Raises:
        DataError: the source is missing, unreadable, has no rows or is of an unsupported kind.

    Example:
        >>> load_raw(["a b c d", "e"], chunk_words=2)["text"][:]
        ['a b', 'c d', 'e']
    """
    src = resolve_source(source)
    ds = _load(src, source, split=split, text_field=text_field)
    if ds.num_rows == 0:
        raise DataError(f"dataset `{src.source}` has no rows; add examples or point `dataset` elsewhere.")
    if chunk_words < 0:
        raise DataError(f"`chunk_words` must be >= 0, got {chunk_words}; use 0 to keep lines whole.")
    if chunk_words > 0:
        ds = _chunk(ds, chunk_words, text_field, src.source)
    if dedupe:
        rows, dropped = dedupe_rows(ds.to_list())
        logger.info("Dropped %d duplicate row(s) of %s.", dropped, src.source)
        ds = _from_rows(rows, src.source)
    logger.info("Loaded %d row(s) with columns %s from %s.", ds.num_rows, ds.column_names, src.source)
    return ds


def resolve_source(source: Any) -> _Source:
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


def _load(src: _Source, obj: Any, *, split: str, text_field: str) -> datasets.Dataset:
    if src.kind == "memory":
        return _from_object(obj, split, text_field)
    if src.kind == "hub":
        return _from_hub(src.source, split)
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
            raise DataError(f"DatasetDict has no split `{split}`, only {quote_names(obj)}; set `dataset_split`.")
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


def _from_hub(hub_id: str, split: str) -> datasets.Dataset:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=split)
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
    require_columns(ds, where, {"text": ("text_field", text_field)}, "text")
    rows: list[dict[str, Any]] = []
    for row in ds.to_list():
        words = str(row[text_field] or "").split()
        for i in range(0, len(words), chunk_words):
            rows.append({**row, text_field: " ".join(words[i : i + chunk_words])})
    return _from_rows(rows, where)


def dedupe_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    seen: set[bytes] = set()
    kept = []
    for row in rows:
        key = canonical_json(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def require_columns(ds: datasets.Dataset, where: str, columns: dict[str, tuple[str, str]], fmt: str) -> None:
    for field_name, column in columns.values():
        if column not in ds.column_names:
            raise DataError(
                f"dataset `{where}` has no column `{column}` (needed for the {fmt} format); its columns are "
                f"{quote_names(ds.column_names)}. Set `{field_name}` to the column that holds it"
                " (or `dataset_format` to another format)."
            )


def canonical_json(row: Any) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def quote_names(columns: Iterable[str]) -> str:
    return ", ".join(f"`{c}`" for c in columns) or "(none)"
