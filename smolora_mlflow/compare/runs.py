"""Runs of the tracking store as DataFrames: the runs table, metric histories, param diffs, labels, generations.

The readers the rest of :mod:`smolora_mlflow.compare` builds on (the plots in
:mod:`~smolora_mlflow.compare.plots`, the sweep table in :mod:`~smolora_mlflow.compare.sweeps`) live here too:
opening runs by id, searching an experiment, and the errors that name what exists.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from smolora_mlflow import constants as C
from smolora_mlflow.errors import invalid_input

KEY_PARAMS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate", "max_steps",
              "num_train_epochs", "effective_batch_size", "max_length", "seed", "base_model", "dataset")
KEY_METRICS = (C.METRIC_LOSS, C.METRIC_EVAL_LOSS, C.METRIC_EVAL_PERPLEXITY)
RUN_METRICS = (C.METRIC_TRAIN_LOSS, C.METRIC_TRAINABLE_PARAMS, C.METRIC_TRAINABLE_PERCENT, C.METRIC_ADAPTER_SIZE)
# Params that differ between runs without saying anything about the model: where files went, what the
# run was called, and outcomes that tracking also logs as params.
BOOKKEEPING_PARAMS = frozenset({"output_dir", "run_name", "experiment_name", "resume_from_checkpoint",
                                "registered_model_name", "tracking", C.METRIC_TRAINABLE_PARAMS,
                                C.METRIC_TOTAL_PARAMS, C.METRIC_TRAINABLE_PERCENT})


def not_found(msg: str) -> MlflowException:
    """An MLflow "does not exist" error (404 at a server) with ``msg``."""
    return MlflowException(msg, error_code=RESOURCE_DOES_NOT_EXIST)


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Known: {', '.join(choices[:30]) or '(none)'}{' ...' if len(choices) > 30 else ''}."


def no_metric_error(runs: list[Run], key: str, who: str) -> MlflowException:
    """The error for metric ``key`` that ``who`` never logged, with the closest metric the runs have."""
    known = {k for r in runs for k in r.data.metrics}
    return invalid_input(f"{who} logged metric {key!r}.{_suggest(key, known)}")


def _experiment_ids(client: MlflowClient, experiment: str | Sequence[str]) -> list[str]:
    names = [experiment] if isinstance(experiment, str) else list(experiment)
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(str(name))
        if exp is None and str(name).isdigit():
            try:
                exp = client.get_experiment(str(name))
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        if exp is None:
            known = [x.name for x in client.search_experiments(max_results=200)]
            raise not_found(f"Experiment {name!r} does not exist in {client.tracking_uri}; pass an experiment "
                            f"name or id.{_suggest(str(name), known)}")
        ids.append(exp.experiment_id)
    return ids


def open_runs(run_ids: str | Iterable[str], client: MlflowClient | None,
              tracking_uri: str | None) -> tuple[MlflowClient, list[Run]]:
    """The client and the runs of ``run_ids`` (one id or many, duplicates dropped); unknown ids named at once."""
    client = client or MlflowClient(tracking_uri=tracking_uri)
    ids = list(dict.fromkeys([run_ids] if isinstance(run_ids, str) else run_ids))
    if not ids:
        raise invalid_input("`run_ids` is empty; pass one or more MLflow run ids.")
    runs, unknown = [], []
    for rid in ids:
        try:
            runs.append(client.get_run(rid))
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            unknown.append(rid)
    if unknown:
        raise not_found(f"Run id(s) {', '.join(map(repr, unknown))} do not exist in {client.tracking_uri}; take "
                        "ids from runs_frame(experiment)['run_id'].")
    return client, runs


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str | None,
               order_by: list[str] | None, max_results: int) -> list[Run]:
    """Up to ``max_results`` runs of a search, read page by page."""
    runs: list[Run] = []
    token = None
    while len(runs) < max_results:
        page = client.search_runs(experiment_ids, filter_string or "", max_results=min(1000, max_results - len(runs)),
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def _registered(client: MlflowClient, run_ids: list[str]) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for i in range(0, len(run_ids), 100):
        quoted = ", ".join(f"'{rid}'" for rid in run_ids[i : i + 100])
        for mv in client.search_model_versions(f"run_id IN ({quoted})"):
            stage = f" ({mv.current_stage})" if mv.current_stage not in (None, "", "None") else ""
            found.setdefault(mv.run_id, []).append(f"{mv.name}/{mv.version}{stage}")
    return {rid: ", ".join(sorted(v)) for rid, v in found.items()}


def typed_column(column: pd.Series) -> pd.Series:
    """Params are stored as text; give a column numbers when every value is one."""
    try:
        return pd.to_numeric(column.replace({"None": None}))
    except (ValueError, TypeError):
        return column


def history_frame(client: MlflowClient, runs: list[Run], key: str) -> pd.DataFrame:
    """Every logged point of metric ``key`` of ``runs``, one row each (run, step, value, UTC timestamp)."""
    rows = [{"run_id": r.info.run_id, "run_name": r.info.run_name, "step": m.step, "value": m.value,
             "timestamp": m.timestamp} for r in runs for m in client.get_metric_history(r.info.run_id, key)]
    if not rows:
        raise no_metric_error(runs, key, f"No run among {[r.info.run_id for r in runs]}")
    df = pd.DataFrame(rows).sort_values(["run_id", "step", "timestamp"], kind="stable").reset_index(drop=True)
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
    return df


def _frame(client: MlflowClient, runs: list[Run], params: Sequence[str], with_best: bool) -> pd.DataFrame:
    registered = _registered(client, [r.info.run_id for r in runs]) if runs else {}
    rows = []
    for run in runs:
        info, metrics = run.info, run.data.metrics
        row: dict[str, Any] = {
            "run_id": info.run_id, "run_name": info.run_name, "status": info.status,
            "start_time": pd.Timestamp(info.start_time, unit="ms", tz="UTC"),
            "duration_s": (info.end_time - info.start_time) / 1000 if info.end_time else float("nan"),
        }
        row.update({p: run.data.params.get(p) for p in params})
        for key in KEY_METRICS:
            row[f"final_{key}"] = metrics.get(key, float("nan"))
            if with_best:
                values = [m.value for m in client.get_metric_history(info.run_id, key)] if key in metrics else []
                row[f"best_{key}"] = min(values, default=float("nan"))
        row.update({key: metrics.get(key, float("nan")) for key in RUN_METRICS})
        row["registered_version"] = registered.get(info.run_id, "")
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(rows[0]) if rows else ["run_id", "run_name", "status", *params])
    for p in params:
        df[p] = typed_column(df[p])
    for key in (C.METRIC_TRAINABLE_PARAMS, C.METRIC_ADAPTER_SIZE):
        if key in df:
            df[key] = df[key].astype("Int64")
    return df


def runs_frame(experiment: str | Sequence[str], filter: str | None = None, *, params: Sequence[str] | None = None,
               order_by: Sequence[str] | None = None, max_results: int = 1000, with_best: bool = True,
               client: MlflowClient | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per run of ``experiment``: settings, final and best metrics, size, duration, registry version.

    Args:
        experiment: experiment name or id (or several).
        filter: MLflow search filter, e.g. ``"params.lora_r = '8'"`` or ``"tags.sweep = 'a'"``.
        params: param columns (default :data:`KEY_PARAMS`); numeric when every value is a number.
        order_by: MLflow ``order_by`` clauses (default: oldest run first).
        max_results: at most this many runs.
        with_best: add ``best_<metric>`` (minimum over the history) next to each ``final_<metric>``; this
            reads each run's history, so turn it off for very large experiments.
        client, tracking_uri: an MlflowClient, or the URI to open one for (default: MLflow's current URI).

    Returns:
        Columns ``run_id, run_name, status, start_time, duration_s``, the params, ``final_loss, best_loss,
        final_eval_loss, ...``, ``train_loss, trainable_params, trainable_percent, adapter_size_bytes`` and
        ``registered_version`` (``"name/3 (Production)"``, or empty).

    Example:
        >>> runs_frame("smolora", "params.lora_r != '2'")[["run_name", "lora_r", "final_eval_loss"]]  # doctest: +SKIP
    """
    client = client or MlflowClient(tracking_uri=tracking_uri)
    ids = _experiment_ids(client, experiment)
    runs = search_all(client, ids, filter, list(order_by or ["attributes.start_time ASC"]), max_results)
    return _frame(client, runs, list(params or KEY_PARAMS), with_best)


def metric_history(run_ids: str | Iterable[str], key: str, *, client: MlflowClient | None = None,
                   tracking_uri: str | None = None) -> pd.DataFrame:
    """Every logged value of metric ``key`` for each run, in long format.

    Returns:
        Columns ``run_id, run_name, step, value, timestamp`` (UTC), sorted by run and step.

    Raises:
        MlflowException: an unknown run id, or no run logged ``key`` (the message lists the known keys).

    Example:
        >>> metric_history(ids, "eval_loss").pivot(index="step", columns="run_name", values="value")  # doctest: +SKIP
    """
    return history_frame(*open_runs(run_ids, client, tracking_uri), key)


def _diff(runs: list[Run], ignore: Iterable[str]) -> pd.DataFrame:
    skip = set(ignore)
    keys = sorted({k for r in runs for k in r.data.params} - skip)
    table = pd.DataFrame([{k: r.data.params.get(k) for k in keys} for r in runs], columns=keys,
                         index=pd.Index([r.info.run_id for r in runs], name="run_id"))
    differing = [k for k in keys if table[k].nunique(dropna=False) > 1]
    ordered = [k for k in KEY_PARAMS if k in differing] + [k for k in differing if k not in KEY_PARAMS]
    return table[ordered].apply(typed_column)


def param_diff(run_ids: str | Iterable[str], *, ignore: Iterable[str] = BOOKKEEPING_PARAMS,
               client: MlflowClient | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """The params whose values differ between the runs (one row per run, indexed by run id).

    Args:
        run_ids: the runs to compare.
        ignore: param names left out (default :data:`BOOKKEEPING_PARAMS`: output folder, run name, ...).
        client, tracking_uri: where the runs are.

    Example:
        >>> param_diff(ids).columns.tolist()  # doctest: +SKIP
        ['lora_r']
    """
    return _diff(open_runs(run_ids, client, tracking_uri)[1], ignore)


def labels_by_run(runs: list[Run]) -> dict[str, str]:
    """A label per run id: the params that differ between ``runs`` (``lora_r=8``), else the run's name."""
    diff = _diff(runs, BOOKKEEPING_PARAMS)
    labels = {}
    for run in runs:
        row = diff.loc[run.info.run_id] if not diff.empty else {}
        text = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in dict(row).items())
        labels[run.info.run_id] = text or run.info.run_name or run.info.run_id[:8]
    if len(set(labels.values())) < len(labels):  # same settings twice: the run name tells them apart
        labels = {r.info.run_id: f"{labels[r.info.run_id]} ({r.info.run_name or r.info.run_id[:8]})" for r in runs}
    return labels


def run_labels(run_ids: str | Iterable[str], *, client: MlflowClient | None = None,
               tracking_uri: str | None = None) -> dict[str, str]:
    """A short label per run from the params that differ (``"lora_r=8"``); the run name when none differ.

    Example:
        >>> run_labels(ids)  # doctest: +SKIP
        {'4a9f...': 'lora_r=2', '7c1e...': 'lora_r=8'}
    """
    return labels_by_run(open_runs(run_ids, client, tracking_uri)[1])


def _generations_table(client: MlflowClient, run: Run) -> pd.DataFrame:
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    if C.ARTIFACT_GENERATIONS not in names:
        raise not_found(f"Run {run.info.run_id} ({run.info.run_name}) has no {C.ARTIFACT_GENERATIONS}: sample "
                        "generations are logged at each evaluation, so train with eval_fraction > 0.")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, C.ARTIFACT_GENERATIONS, tmp)
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    return pd.DataFrame(data["data"], columns=data["columns"])


def generations(run_ids: str | Iterable[str], step: int | None = None, *, client: MlflowClient | None = None,
                tracking_uri: str | None = None) -> pd.DataFrame:
    """Sample generations side by side: one row per prompt, one column per run (labelled by its params).

    Args:
        run_ids: the runs to compare.
        step: the evaluation step to show; None shows each run's last one.
        client, tracking_uri: where the runs are.

    Returns:
        A DataFrame indexed by ``prompt``; ``df.attrs["steps"]`` maps each column to the step it shows.

    Example:
        >>> generations(ids).loc["The food was"]  # doctest: +SKIP
    """
    client, runs = open_runs(run_ids, client, tracking_uri)
    labels = labels_by_run(runs)
    columns, steps = {}, {}
    for run in runs:
        table = _generations_table(client, run)
        chosen = int(table["step"].max()) if step is None else int(step)
        part = table[table["step"] == chosen]
        if part.empty:
            raise invalid_input(
                f"Run {run.info.run_id} ({run.info.run_name}) has no generations at step {step}; it has steps "
                f"{sorted(set(table['step'].tolist()))}. Pass one of those, or step=None for the last.")
        label = labels[run.info.run_id]
        columns[label] = part.drop_duplicates("prompt").set_index("prompt")["generated_text"]
        steps[label] = chosen
    df = pd.concat(columns, axis=1, sort=False)
    df.index.name, df.columns.name = "prompt", None
    df.attrs["steps"] = steps
    return df


def best_run(experiment: str | Sequence[str], metric: str = C.METRIC_EVAL_LOSS, *, higher_is_better: bool = False,
             filter: str | None = None, client: MlflowClient | None = None,
             tracking_uri: str | None = None) -> pd.Series:
    """The finished run of ``experiment`` with the best final ``metric``, as a :func:`runs_frame` row.

    Args:
        experiment: experiment name or id (or several).
        metric: the metric to rank by (its last logged value).
        higher_is_better: rank by the highest value instead of the lowest.
        filter: MLflow search filter that narrows the candidates (only FINISHED runs count).
        client, tracking_uri: where the runs are.

    Raises:
        MlflowException: unknown experiment, no finished run, or no run logged ``metric``.

    Example:
        >>> best = best_run("smolora", "eval_loss", filter="tags.sweep = 'a'")  # doctest: +SKIP
        >>> best["run_id"], best["lora_r"], best["final_eval_loss"]              # doctest: +SKIP
    """
    client = client or MlflowClient(tracking_uri=tracking_uri)
    ids = _experiment_ids(client, experiment)
    finished = "attributes.status = 'FINISHED'"
    order = [f"metrics.`{metric}` {'DESC' if higher_is_better else 'ASC'}"]  # runs without it sort last
    runs = search_all(client, ids, f"{filter} and {finished}" if filter else finished, order, 1)
    if not runs:
        raise not_found(f"No FINISHED run in experiment {experiment!r}" + (f" matches {filter!r}." if filter else "."))
    if metric not in runs[0].data.metrics:
        raise no_metric_error(runs, metric, f"No finished run in {experiment!r}")
    return _frame(client, runs, list(KEY_PARAMS), with_best=True).iloc[0].rename(runs[0].info.run_id)
