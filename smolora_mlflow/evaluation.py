"""Evaluate a causal LM on a dataset (token-level loss, perplexity, sample generations), and load the model
that a user names in any of the usual ways.

A model reference is a run id (its logged model, else its ``adapter`` artifact), ``runs:/`` or
``models:/`` URI, an MLflow model folder, a merged Hugging Face folder, a PEFT adapter folder, or
``smolora:demo``. The loss is computed the way TRL's ``SFTTrainer`` builds its labels: text gets an EOS
token, prompt/completion rows score only the completion, chats are rendered with the chat template;
sequences are cut at ``max_length``. The loss is the mean over every scored token of the split.

Example:
    >>> from smolora_mlflow.config import SmoloraConfig
    >>> split = eval_split(SmoloraConfig(eval_fraction=0.1))
    >>> loaded = load_for_inference("models:/reviews/1")          # doctest: +SKIP
    >>> eval_loss(loaded.model, loaded.tokenizer, split.rows, split.format, max_length=64)  # doctest: +SKIP
    {'eval_loss': 2.31, 'eval_perplexity': 10.1, 'eval_tokens': 812.0, 'eval_rows': 40.0}
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolora_mlflow.config import DEMO_MODEL, SmoloraConfig

logger = logging.getLogger(__name__)

RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
TAG_TRAIN_RUN_ID = "smolora.train_run_id"  # set on a pipeline's parent run
_MODEL_REF_HELP = ("a run id, runs:/<run_id>/<name>, models:/<name>/<version|stage>, models:/<name>@<alias>, "
                   "an MLflow model folder, a merged model folder, a PEFT adapter folder or smolora:demo")


@dataclass
class LoadedModel:
    """A model ready for generation, with where it came from."""

    model: Any
    tokenizer: Any
    source: str


@dataclass
class EvalSplit:
    """The rows an evaluation scores, with a description for the run record."""

    rows: list[dict[str, Any]]
    format: str
    description: str
    data: Any  # PreparedData
    dataset: Any  # datasets.Dataset of ``rows``


def is_run_id(ref: str) -> bool:
    return bool(RUN_ID_RE.fullmatch(str(ref)))


# ----------------------------------------------------------------------------------------------------
# which rows


def eval_split(cfg: SmoloraConfig, dataset: Any = None) -> EvalSplit:
    """The held-out split of ``cfg.dataset`` (same seed and fraction as training), or all rows of ``dataset``.

    With ``eval_fraction`` 0 there is no held-out split; every row is scored and the description says that
    the model saw them in training.
    """
    from smolora_mlflow.data import prepare_data

    if dataset is not None:
        data = prepare_data(cfg.replace(eval_fraction=0.0, max_samples=None), dataset)
        return EvalSplit(data.train.to_list(), data.format, f"all {data.num_train} rows of {data.name}", data,
                         data.train)
    data = prepare_data(cfg)
    if data.eval is not None:
        return EvalSplit(data.eval.to_list(), data.format,
                         f"held-out {data.num_eval} rows (eval_fraction={cfg.eval_fraction:g}) of {data.name}",
                         data, data.eval)
    logger.warning("eval_fraction is 0, so %s has no held-out rows; scoring its %d training rows instead.",
                   data.name, data.num_train)
    return EvalSplit(data.train.to_list(), data.format,
                     f"all {data.num_train} training rows of {data.name} (eval_fraction=0: not held out)",
                     data, data.train)


# ----------------------------------------------------------------------------------------------------
# loss and perplexity


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run logs a large finite number instead of inf."""
    return math.exp(min(float(loss), 50.0))



def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_row(tokenizer, row: dict[str, Any], fmt: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one row, labels ``-100`` where nothing is scored."""
    eos = tokenizer.eos_token or ""
    if fmt == "chat":
        ids = list(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
        labels = list(ids)
    elif fmt == "prompt_completion":
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + completion)["input_ids"]
        start = _common_prefix(prompt_ids, ids)
        labels = [-100] * start + ids[start:]
    else:
        text = row["text"] if row["text"].endswith(eos) else row["text"] + eos
        ids = tokenizer(text)["input_ids"]
        labels = list(ids)
    return ids[:max_length], labels[:max_length]


def eval_loss(model, tokenizer, rows: list[dict[str, Any]], fmt: str, *, max_length: int, batch_size: int = 8,
              progress: bool | None = None) -> dict[str, float]:
    """Mean next-token loss over every scored token of ``rows``, and its perplexity.

    Returns:
        ``eval_loss``, ``eval_perplexity``, ``eval_tokens`` (scored tokens) and ``eval_rows``.
    """
    import torch
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("no rows to evaluate; pass a dataset with at least one example.")
    encoded = [encode_row(tokenizer, r, fmt, max_length) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    show = _progress_enabled() if progress is None else progress
    model.eval()
    for start in tqdm(range(0, len(encoded), batch_size), desc="evaluating", unit="batch", disable=not show):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   target.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((target != -100).sum())
    if count == 0:
        raise ValueError(f"none of the {len(rows)} rows has a token to score within max_length={max_length}; "
                         "raise `max_length` or check the completions.")
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss), "eval_tokens": float(count),
            "eval_rows": float(len(rows))}


def _progress_enabled() -> bool:
    from smolora_mlflow.modelio import progress_enabled

    return progress_enabled()


def sample_generations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy completions of ``prompts``, as rows ``{"prompt", "generated_text"}``."""
    from smolora_mlflow.generation import generate

    if not prompts:
        return []
    outputs = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    return [{"prompt": p, "generated_text": o} for p, o in zip(prompts, outputs, strict=True)]


# ----------------------------------------------------------------------------------------------------
# finding and loading the model


def logged_model_uri_of_run(run_id: str) -> str | None:
    """``models:/<model_id>`` of the model a run logged (the one named ``model`` if several), else None.

    A pipeline's parent run points to its training run through the ``smolora.train_run_id`` tag.
    """
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    found = list(client.search_logged_models([run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}'"))
    if found:
        named = [m for m in found if m.name == "model"] or found
        return f"models:/{max(named, key=lambda m: m.creation_timestamp).model_id}"
    child = run.data.tags.get(TAG_TRAIN_RUN_ID)
    return logged_model_uri_of_run(child) if child and child != run_id else None


def training_run_of(ref: str) -> str | None:
    """The MLflow run that trained the model ``ref`` names, where that is recorded."""
    import mlflow

    ref = str(ref)
    if is_run_id(ref) or ref.startswith("runs:/"):
        run_id = ref.removeprefix("runs:/").split("/", 1)[0]
        return mlflow.MlflowClient().get_run(run_id).data.tags.get(TAG_TRAIN_RUN_ID, run_id)
    if ref.startswith("models:/m-"):
        return mlflow.MlflowClient().get_logged_model(ref.removeprefix("models:/")).source_run_id
    if ref.startswith("models:/"):
        from smolora_mlflow import registry

        body = ref.removeprefix("models:/")
        name, sep, key = body.partition("@") if "@" in body else body.partition("/")
        return registry.resolve(name, key if sep else "latest").run_id
    mlmodel = Path(ref) / "MLmodel"
    if mlmodel.is_file():
        import yaml

        flavors = yaml.safe_load(mlmodel.read_text(encoding="utf-8")).get("flavors", {})
        return (flavors.get("smolora") or {}).get("training_run_id")
    return None


def training_config_of(ref: str) -> SmoloraConfig | None:
    """The resolved config that the training run of ``ref`` logged, or None if none is recorded."""
    import mlflow

    from smolora_mlflow import constants as C

    run_id = training_run_of(ref)
    if not run_id:
        return None
    client = mlflow.MlflowClient()
    folder = C.ARTIFACT_CONFIG.rsplit("/", 1)[0]
    if not any(f.path == C.ARTIFACT_CONFIG for f in client.list_artifacts(run_id, folder)):
        return None
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/{C.ARTIFACT_CONFIG}")
    import yaml

    from smolora_mlflow.config import field_names

    values = yaml.safe_load(text) or {}
    # Secrets were redacted when logged; the tracking URI is where we already are; a field this version
    # does not know (a run logged by another smolora version) cannot matter to an evaluation here.
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        logger.warning("Ignoring fields %s of the config logged by run %s.", unknown, run_id)
    drop = [k for k, v in values.items() if v == "***"] + ["tracking_uri", *unknown]
    return SmoloraConfig.from_dict({k: v for k, v in values.items() if k not in drop})


def load_for_inference(ref: str | os.PathLike, *, device: str = "auto") -> LoadedModel:
    """Load the model ``ref`` names as ``(model, tokenizer)`` in eval mode.

    Raises:
        FileNotFoundError: a path that holds no model, or a run that logged none.
    """
    ref = str(ref)
    if is_run_id(ref):
        uri = logged_model_uri_of_run(ref)
        if uri is not None:
            return _load_mlflow_model(uri, device)
        return _load_run_adapter(ref, device)
    if ref.startswith(("runs:/", "models:/")) or "://" in ref:
        return _load_mlflow_model(ref, device)
    if ref == DEMO_MODEL:
        from smolora_mlflow.modelio import resolve_model_path

        return _load_hf(resolve_model_path(ref), device, source=ref)
    path = Path(ref).expanduser()
    if (path / "MLmodel").is_file():
        return _load_mlflow_model(str(path.resolve()), device)
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path, None, device)
    if (path / "config.json").is_file():
        return _load_hf(str(path.resolve()), device, source=str(path))
    raise FileNotFoundError(f"no model at {ref!r}; pass {_MODEL_REF_HELP}.")


def _load_mlflow_model(uri: str, device: str) -> LoadedModel:
    from smolora_mlflow import flavor

    model, tokenizer = flavor.load_model(uri, device=device)
    return LoadedModel(model.eval(), tokenizer, uri)


def _load_hf(path: str, device: str, *, source: str) -> LoadedModel:
    from smolora_mlflow import modelio
    from smolora_mlflow.generation import resolve_device

    dev = resolve_device(device)
    tokenizer = modelio.load_tokenizer(path)
    model = modelio.load_causal_lm(path, dtype=modelio.resolve_dtype("auto", dev.type), device=dev)
    return LoadedModel(model.eval(), tokenizer, source)


def _load_adapter(adapter_dir: Path, base_model: str | None, device: str, source: str | None = None) -> LoadedModel:
    from peft import PeftModel

    from smolora_mlflow import merge, modelio
    from smolora_mlflow.generation import resolve_device

    recorded = merge.read_adapter_base(adapter_dir)
    base = base_model or recorded.get("base_model") or recorded["peft_base"]
    path = modelio.resolve_model_path(base)
    dev = resolve_device(device)
    tokenizer = modelio.load_tokenizer(path)
    model = modelio.load_causal_lm(path, dtype=modelio.resolve_dtype("auto", dev.type))
    merge.check_adapter_matches_base(adapter_dir, path, model)
    with modelio.quiet_upstream_deprecations():
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return LoadedModel(model.to(dev).eval(), tokenizer, source or str(adapter_dir))


def _load_run_adapter(run_id: str, device: str) -> LoadedModel:
    import mlflow

    from smolora_mlflow import constants as C

    client = mlflow.MlflowClient()
    names = {f.path for f in client.list_artifacts(run_id, C.ARTIFACT_ADAPTER)}
    if f"{C.ARTIFACT_ADAPTER}/adapter_config.json" not in names:
        raise FileNotFoundError(f"run {run_id} logged no model and no adapter; pass {_MODEL_REF_HELP}.")
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=C.ARTIFACT_ADAPTER)
    base = client.get_run(run_id).data.tags.get(C.TAG_BASE_MODEL)
    return _load_adapter(Path(local), base, device, source=f"runs:/{run_id}/{C.ARTIFACT_ADAPTER}")
