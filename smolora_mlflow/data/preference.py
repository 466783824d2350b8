"""Data for the preference and reinforcement methods: DPO pairs, KTO labelled completions, GRPO prompts.

Rows keep TRL's standard column names, each value plain text or a list of chat messages (TRL's
"conversational" form): ``prompt``/``chosen``/``rejected`` (DPO, TRL's *preference* type),
``prompt``/``completion``/``label`` (KTO, *unpaired preference*) and ``prompt`` with an optional
``answer`` (GRPO, *prompt-only*; the answer reaches reward functions as a keyword). A pair set also feeds KTO
(chosen rows labelled true, rejected false) and GRPO (chosen is the answer), so the bundled demo pairs serve
every method. A missing column raises :class:`DataError` listing the columns present and what the method needs.

Example:
    >>> from smolora_mlflow.config import SmoloraConfig
    >>> data = prepare_method_data(SmoloraConfig(method="dpo"))
    >>> data.format, sorted(data.train.column_names)
    ('preference', ['chosen', 'prompt', 'rejected'])
"""

from __future__ import annotations

from typing import Any

from smolora_mlflow.config import SmoloraConfig
from smolora_mlflow.data.prepare import PreparedData, _fingerprint, _messages, _split, _string
from smolora_mlflow.data.sources import DataError, dedupe_rows, load_raw, quote_names, resolve_source
from smolora_mlflow.models.demo import DEMO_PREFERENCES, is_demo_dataset

FORMATS = {"dpo": "preference", "kto": "unpaired_preference", "grpo": "prompt_only"}
NEEDS = {"dpo": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion", "label"), "grpo": ("prompt",)}
ANSWER = "answer"


def prepare_method_data(cfg: SmoloraConfig, dataset: Any = None) -> PreparedData:
    """Load, check, normalise and split the data of a DPO, KTO or GRPO run.

    ``prompt_field`` and ``completion_field`` name the prompt and (KTO) completion columns; the default
    dataset (``smolora:reviews``) stands for the bundled demo preference pairs.

    Raises:
        DataError: a needed column is missing, a value is neither text nor chat messages, or no row is left.
    """
    obj = cfg.dataset if dataset is None else dataset
    if is_demo_dataset(obj):
        obj = str(DEMO_PREFERENCES)
    src = resolve_source(obj)
    raw = load_raw(obj, split=cfg.dataset_split)
    columns = raw.column_names
    rename = {cfg.prompt_field: "prompt", cfg.completion_field: "completion"}
    table = {rename.get(c, c): v for c, v in raw.to_dict().items()}
    if cfg.method == "kto" and "completion" not in table and {"chosen", "rejected"} <= set(table):
        table = _pairs_to_unpaired(table)
    if cfg.method == "grpo" and ANSWER not in table and "chosen" in table:
        table[ANSWER] = table["chosen"]
    missing = [c for c in NEEDS[cfg.method] if c not in table]
    if missing:
        raise DataError(
            f"dataset `{src.source}` has no column(s) {quote_names(missing)} for `method: {cfg.method}`; its "
            f"columns are {quote_names(columns)}. {cfg.method.upper()} needs {quote_names(NEEDS[cfg.method])}"
            f"{_extra_hint(cfg.method)} (set `prompt_field`/`completion_field` to rename the prompt/completion)."
        )
    keep = [*NEEDS[cfg.method], *([ANSWER] if cfg.method == "grpo" and ANSWER in table else [])]
    rows = [_row({k: table[k][i] for k in keep}, i, src.source) for i in range(len(table["prompt"]))]
    rows = [r for r in rows if r is not None]
    if cfg.dedupe:
        rows, _ = dedupe_rows(rows)
    if not rows:
        raise DataError(f"dataset `{src.source}` has no non-empty rows in {quote_names(keep)}.")
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    train_rows, eval_rows = _split(rows, cfg.eval_fraction, cfg.seed, src.source)
    return PreparedData(train=_dataset(train_rows, "train"), eval=_dataset(eval_rows, "eval") if eval_rows else None,
                        format=FORMATS[cfg.method], source=src.source, name=src.name,
                        fingerprint=_fingerprint(train_rows, eval_rows))


def as_chat_turns(data: PreparedData) -> PreparedData:
    """Plain-text DPO/KTO/GRPO rows as TRL's conversational rows (the prompt a user turn, each completion an
    assistant turn), so a chat-format run trains through the chat template it is served with; rows that are
    already chat messages, and SFT data, are returned as they are."""
    import dataclasses

    from smolora_mlflow.models.generation import chat_messages

    if data.format not in FORMATS.values() or not isinstance(data.train[0]["prompt"], str):
        return data
    replies = ("chosen", "rejected", "completion")

    def turns(row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row, prompt=chat_messages(row["prompt"]))
        out.update({k: chat_messages("", row[k])[1:] for k in replies if k in row})
        return out

    def convert(ds):
        return None if ds is None else _dataset([turns(r) for r in ds.to_list()], str(ds.split))

    return dataclasses.replace(data, train=convert(data.train), eval=convert(data.eval))


def as_scored(data: PreparedData) -> PreparedData:
    """``data`` as prompt/completion rows whose completion is the *desired* one (DPO's chosen, KTO's
    label-true completion, GRPO's answer), so the evaluation's loss and perplexity read the same on every
    method: how likely the fine-tuned model finds the answers it was taught to prefer. SFT data as it is."""
    import dataclasses

    if data.format not in FORMATS.values():
        return data

    def rows(ds):
        if ds is None:
            return None
        out = []
        for r in ds.to_list():
            good = r.get("chosen") if "chosen" in r else r.get("completion") if r.get("label", True) else None
            good = r.get(ANSWER) if data.format == "prompt_only" else good
            if isinstance(r["prompt"], str) and isinstance(good, str) and good.strip():
                out.append({"prompt": r["prompt"], "completion": good})
        return _dataset(out, str(ds.split)) if out else None

    return dataclasses.replace(data, train=rows(data.train), eval=rows(data.eval), format="prompt_completion")


def _extra_hint(method: str) -> str:
    return {"dpo": ", each plain text or chat messages",
            "kto": " (label true/false), or a pair set with `chosen`/`rejected`",
            "grpo": " and optionally `answer` for the reward functions"}[method]


def _pairs_to_unpaired(table: dict[str, list]) -> dict[str, list]:
    n = len(table["prompt"])
    return {"prompt": table["prompt"] * 2, "completion": table["chosen"] + table["rejected"],
            "label": [True] * n + [False] * n}


def _row(row: dict[str, Any], i: int, where: str) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for key, value in row.items():
        what = f"row {i} of `{where}`: column `{key}`"
        if key == "label":
            if not isinstance(value, bool):
                raise DataError(f"{what} must be true or false (desirable or not), got {value!r:.60}.")
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = _messages(list(value), i, key, where)
        else:
            out[key] = _string(value, what)
    texts = [v if isinstance(v, str) else " ".join(m["content"] for m in v) for k, v in out.items() if k != "label"]
    return None if any(not t.strip() for t in texts) else out


def _dataset(rows: list[dict[str, Any]], split: str):
    import datasets

    return datasets.Dataset.from_list(rows, split=datasets.NamedSplit(split))
