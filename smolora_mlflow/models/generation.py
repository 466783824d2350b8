"""Prompt formatting, batched generation and streaming, shared by the SmoLoRA class and the flavor.

Everything here works on a plain ``transformers`` causal LM and its tokenizer; nothing imports peft or
trl, so a served model needs neither. Batches are left-padded with an attention mask, and each prompt
is tokenized on its own before padding, so greedy decoding gives the same text for a prompt alone or
in a batch.

Example:
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> model = AutoModelForCausalLM.from_pretrained(path)
    >>> tokenizer = AutoTokenizer.from_pretrained(path)
    >>> generate(model, tokenizer, ["The food was", "Our waiter"], max_new_tokens=8)
    [' great and the service', ' was friendly']
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from smolora_mlflow.models.decoding import DYNAMIC, DecodeSettings, decode_settings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The generation parameters every entry point accepts (Python API, CLI, pyfunc params, served requests):
# name -> (type, default). The flavor's params schema and input checks are built from this table.
GENERATION_PARAMS: dict[str, tuple[type, Any]] = {
    "max_new_tokens": (int, 64),
    "temperature": (float, 1.0),
    "top_p": (float, 1.0),
    "top_k": (int, 50),
    "do_sample": (bool, False),
    "repetition_penalty": (float, 1.0),
    "seed": (int, -1),  # -1: no seeding
    "return_full_text": (bool, False),
}
GENERATION_DEFAULTS: dict[str, Any] = {name: default for name, (_, default) in GENERATION_PARAMS.items()}
# The smallest sampling temperature: scores are divided by it in float32, where 1e-300 is 0 and the division
# gives inf and NaN probabilities (a RuntimeError deep in sampling). Below it, sampling is greedy in all but name.
MIN_TEMPERATURE = 1e-3


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``"auto"`` into the best available device (cuda > mps > cpu); pass others through.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if device != "auto":
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"`device` must be auto, cpu, cuda, cuda:N or mps, got {device!r}.") from e
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_params(params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``GENERATION_DEFAULTS`` updated with ``params``; unknown keys raise ``ValueError``."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(GENERATION_DEFAULTS))
    if unknown:
        raise ValueError(
            f"Unknown generation parameter(s) {unknown}; allowed: {sorted(GENERATION_DEFAULTS)}."
        )
    return {**GENERATION_DEFAULTS, **params}


def generate_kwargs(model, tokenizer, p: Mapping[str, Any], decode: DecodeSettings = DYNAMIC,
                    prompt_tokens: int = 0) -> dict[str, Any]:
    """The ``model.generate`` kwargs for resolved params ``p``: the one place that chooses them.

    Args:
        model, tokenizer: the model and its tokenizer.
        p: params resolved by :func:`resolve_params`.
        decode: the cache and compilation (see :func:`decode_settings`).
        prompt_tokens: the padded prompt width of the batch (sizes a static cache).
    """
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(p["max_new_tokens"]),
        "do_sample": bool(p["do_sample"]),
        "repetition_penalty": float(p["repetition_penalty"]),
    }
    if kwargs["do_sample"]:
        kwargs.update(temperature=float(p["temperature"]), top_p=float(p["top_p"]), top_k=int(p["top_k"]))
    else:
        # Neutralise sampling flags a model's generation_config may set, so greedy runs stay quiet.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is None or gen_cfg.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs["pad_token_id"] = pad
    if decode.cache_implementation == "static":
        step = decode.cache_len_step
        needed = int(prompt_tokens) + kwargs["max_new_tokens"]
        kwargs.update(cache_implementation="static", max_cache_len=-(-needed // step) * step,
                      disable_compile=not decode.compile)
    return kwargs


def _bucket(n: int, decode: DecodeSettings) -> int:
    """The batch size a batch of ``n`` prompts runs at: the next warmed-up size, else ``n``."""
    return next((b for b in decode.batch_sizes if b >= n), n)


def warm_up(model, tokenizer, decode: DecodeSettings, max_new_tokens: int = 4) -> float:
    """Run one short ``generate`` per batch size of ``decode`` so compilation happens now, not in the first
    request; returns the seconds it took (0 when nothing compiles)."""
    import time

    if not decode.compile:
        return 0.0
    started = time.monotonic()
    for size in decode.batch_sizes or (1,):
        generate(model, tokenizer, ["Hello"] * size, batch_size=size, decode=decode, max_new_tokens=max_new_tokens)
    took = time.monotonic() - started
    logger.info("Compiled the decode step for batch sizes %s in %.1f s.", list(decode.batch_sizes), took)
    return took


def _encode(tokenizer, prompts: list[str], device) -> dict[str, Any]:
    """Tokenize each prompt alone, then left-pad, so a prompt's ids never depend on its batch."""
    bos = tokenizer.bos_token
    ids = [
        tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"] for p in prompts
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(x) for x in ids)
    import torch

    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def count_tokens(tokenizer, prompt: str) -> int:
    """Number of tokens ``prompt`` occupies in the model's context, as `generate` encodes it."""
    bos = tokenizer.bos_token
    return len(tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"])


def generate(
    model, tokenizer, prompts: list[str], *, batch_size: int = 8, adapter_names: list[str] | None = None,
    decode: DecodeSettings | None = None, **params: Any
) -> list[str]:
    """Generate one completion per prompt, in order, with one ``model.generate`` call per batch.

    Args:
        model: a ``transformers`` causal LM (eval mode is set here).
        tokenizer: its tokenizer.
        prompts: the prompts.
        batch_size: prompts per ``model.generate`` call.
        adapter_names: a ``PeftModel`` with several adapters loaded: the adapter of each prompt (PEFT's
            mixed-adapter batches; ``"__base__"`` for none), so prompts for different adapters share a call.
        decode: the KV cache and compilation (:func:`decode_settings`); None: ``decode_settings(model)``, the
            static cache compiled on CUDA where supported, the measured faster cache on the CPU.
        **params: keys of ``GENERATION_DEFAULTS``. Greedy unless ``do_sample``; ``seed >= 0`` seeds
            torch once per call; ``return_full_text`` prepends each prompt to its completion.

    Returns:
        The completions, one per prompt.

    Example:
        >>> generate(model, tokenizer, ["Hello"], max_new_tokens=4)
        [' world, how are']
    """
    import torch

    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of strings; wrap a single prompt as [prompt].")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    p = resolve_params(params)
    if not prompts:
        return []
    device = next(model.parameters()).device
    decode = decode_settings(model) if decode is None else decode
    if int(p["seed"]) >= 0:
        torch.manual_seed(int(p["seed"]))
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"`adapter_names` has {len(adapter_names)} names for {len(prompts)} prompts.")
    if model.training:
        model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        # Compiled decoding: pad to a warmed-up batch size (rows decode independently) instead of compiling anew.
        filler = _bucket(len(batch), decode) - len(batch)
        enc = _encode(tokenizer, batch + batch[-1:] * filler, device)
        if adapter_names is not None:
            names = list(adapter_names[start : start + batch_size])
            enc["adapter_names"] = names + names[-1:] * filler
        kwargs = generate_kwargs(model, tokenizer, p, decode, prompt_tokens=enc["input_ids"].shape[1])
        with torch.inference_mode():
            seqs = model.generate(**enc, **kwargs)
        new_tokens = seqs[: len(batch), enc["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        out.extend(pr + t if p["return_full_text"] else t for pr, t in zip(batch, texts, strict=True))
    return out


def _cancel_criteria(cancel: threading.Event):
    """A stopping criterion that ends ``generate`` at the next token once ``cancel`` is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


def stream(
    model, tokenizer, prompt: str, *, lock: threading.Lock | None = None,
    adapter_name: str | Callable[[], str] | None = None, cancel: threading.Event | None = None,
    decode: DecodeSettings | None = None, **params: Any
) -> Iterator[str]:
    """Yield the completion of ``prompt`` piece by piece; the pieces join to ``generate([prompt])[0]``.

    ``model.generate`` runs in a worker thread (holding ``lock`` if given) and feeds a
    ``TextIteratorStreamer``; an error in the worker is re-raised here once the stream ends. Setting
    ``cancel``, or closing the iterator early (a client that went away), stops ``generate`` at the next
    token, so the lock is not held for a completion nobody reads. ``adapter_name`` picks one adapter of a
    multi-adapter ``PeftModel``; a callable is asked for it once ``lock`` is held, so an adapter swapped while
    this stream waited is never asked for. ``decode`` as in :func:`generate` (a batch of one).

    Example:
        >>> "".join(stream(model, tokenizer, "Hello", max_new_tokens=4))
        ' world, how are'
    """
    import torch
    from transformers import TextIteratorStreamer

    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}.")
    p = resolve_params(params)
    device = next(model.parameters()).device
    enc = _encode(tokenizer, [prompt], device)
    decode = decode_settings(model) if decode is None else decode
    kwargs = generate_kwargs(model, tokenizer, p, decode, prompt_tokens=enc["input_ids"].shape[1])
    cancel = cancel or threading.Event()
    kwargs["stopping_criteria"] = _cancel_criteria(cancel)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with lock or nullcontext(), torch.inference_mode():
                if cancel.is_set():  # the client left while this stream waited for the lock
                    streamer.end()
                    return
                if adapter_name is not None:
                    enc["adapter_names"] = [adapter_name() if callable(adapter_name) else adapter_name]
                if int(p["seed"]) >= 0:
                    torch.manual_seed(int(p["seed"]))
                model.eval()
                model.generate(**enc, **kwargs, streamer=streamer)
        except BaseException as e:  # re-raised in the consumer, never swallowed
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=work, name="smolora-stream", daemon=True)
    worker.start()
    try:
        if p["return_full_text"]:
            yield prompt
        for piece in streamer:
            if piece:
                yield piece
    finally:  # also on close(): stop generating for a reader who left
        cancel.set()
    worker.join()
    if errors:
        raise errors[0]


def format_chat(tokenizer, messages: list[dict[str, Any]]) -> str:
    """Render chat ``messages`` with the tokenizer's chat template, ready for the assistant's turn.

    Example:
        >>> format_chat(tokenizer, [{"role": "user", "content": "Hi"}])
        '<|user|>Hi</s><|assistant|>'
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "This tokenizer has no chat template, so chat messages cannot be formatted; send plain "
            "string prompts, or set `tokenizer.chat_template` before saving the model."
        )
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list of {'role', 'content'} dicts.")
    for i, m in enumerate(messages):
        ok = isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        if not ok:
            raise ValueError(f"message {i} must be a dict with string `role` and `content`, got {m!r}.")
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
    )


_INSTRUCT_NAME = re.compile(r"(instruct|chat|-it\b|_it\b|-sft\b)", re.IGNORECASE)


def resolve_prompt_format(setting: str, tokenizer, model_name: str = "") -> str:
    """``chat`` or ``plain``: what the ``prompt_format`` setting means for this tokenizer and base model.

    See :func:`decide_prompt_format`, which also says why. ``chat`` without a chat template is an error
    naming the fix.

    Example:
        >>> resolve_prompt_format("auto", tokenizer, "HuggingFaceTB/SmolLM2-135M-Instruct")
        'chat'
    """
    return decide_prompt_format(setting, tokenizer, model_name)[0]


def _generation_eos(model_name: str, generation_config: Any) -> set[int]:
    """The end-of-sequence ids ``generate`` stops on, from ``generation_config`` or the one saved with the model."""
    if generation_config is None and model_name:
        try:
            from transformers import GenerationConfig

            generation_config = GenerationConfig.from_pretrained(model_name)
        except (OSError, ValueError):  # no generation_config.json (or an id not in the offline cache)
            generation_config = None
    eos = getattr(generation_config, "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else {int(e) for e in eos}


def _end_of_turn(tokenizer) -> str | None:
    """The special token the chat template writes literally after an assistant's turn (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``); None when it writes none, or only the generic ``eos_token`` variable."""
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": "ANSWER"}], tokenize=False)
    except Exception:  # a template that needs more (tools, a system turn): no signal from it
        return None
    after = rendered.split("ANSWER", 1)[-1].lstrip()
    token = next((t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab())
                  if t and after.startswith(t)), None)
    return token if token and token in str(tokenizer.chat_template) else None


def decide_prompt_format(setting: str, tokenizer, model_name: str = "", generation_config: Any = None
                         ) -> tuple[str, str]:
    """(``chat`` or ``plain``, why): what ``prompt_format`` means for this tokenizer and model.

    ``auto`` is ``chat`` when the tokenizer has a chat template and the model was tuned to hold
    conversations: its generation config stops on the token the template writes to end an assistant turn
    (SmolLM2-Instruct's ``<|im_end|>``, Llama 3's ``<|eot_id|>``; a base model with a borrowed template stops
    on its document end instead), or its name says so (``instruct``, ``chat``, ``-it``). A bare ``Question?
    Answer:`` prompt makes such a model end its turn at once. Otherwise ``plain``.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "plain":
        return "plain", "prompt_format is plain"
    if setting == "chat":
        if not has_template:
            raise ValueError("`prompt_format` is 'chat' but the tokenizer has no chat template; set "
                             "`prompt_format` to 'plain' or 'auto', or give the tokenizer a `chat_template`.")
        return "chat", "prompt_format is chat"
    if setting != "auto":
        raise ValueError(f"`prompt_format` must be 'auto', 'chat' or 'plain', got {setting!r}.")
    if not has_template:
        return "plain", "auto: the tokenizer has no chat template"
    turn_end = _end_of_turn(tokenizer)
    if turn_end is not None:
        turn_id = tokenizer.convert_tokens_to_ids(turn_end)
        eos = _generation_eos(model_name, generation_config) or {tokenizer.eos_token_id}
        if turn_id in eos:
            return "chat", (f"auto: the chat template ends an assistant turn with {turn_end}, the token the "
                            "model's generation config stops on")
    # A local folder's own name only (where it was put says nothing about the model: /tmp/chat-tests/m).
    names = [os.path.basename(os.path.normpath(n)) if os.path.isdir(n) else n
             for n in (model_name, str(getattr(tokenizer, "name_or_path", "") or "")) if n]
    name = " ".join(names)
    if _INSTRUCT_NAME.search(name):
        return "chat", f"auto: the model's name ({name.strip()}) says it is instruction-tuned"
    return "plain", ("auto: the chat template's end of turn is not what the model stops on, and its name does not "
                     "say instruction-tuned")


def chat_messages(prompt: str, completion: str | None = None) -> list[dict[str, str]]:
    """A prompt (and its completion) as the user (and assistant) turns of a chat."""
    messages = [{"role": "user", "content": prompt.strip()}]
    if completion is not None:
        messages.append({"role": "assistant", "content": completion.strip()})
    return messages


def render_prompts(tokenizer, prompts: list[str], prompt_format: str) -> list[str]:
    """``prompts`` as the model sees them: through the chat template (as a user turn) when ``chat``."""
    if prompt_format != "chat":
        return list(prompts)
    return [format_chat(tokenizer, chat_messages(p)) for p in prompts]
