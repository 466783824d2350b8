"""How ``generate`` decodes: the KV cache (dynamic or static) and whether transformers compiles the decode step.

:func:`decode_settings` resolves the ``cache_implementation`` and ``compile`` settings (``auto`` by default)
for a loaded model on its device; :func:`smolora_mlflow.models.generation.generate_kwargs` turns the result into
``model.generate`` arguments. No peft or trl here.

Example:
    >>> decode_settings(model)  # a Llama on CUDA
    DecodeSettings(cache_implementation='static', compile=True, cache_len_step=256, batch_sizes=())
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# On the CPU the static cache runs uncompiled; `benchmarks/bench_decode.py` measured it against the dynamic cache
# on the demo model (README, Performance): 0.91x for one prompt, 1.38x for 8, within a shared VM's noise and
# no win for the single stream, so the CPU keeps transformers' default, the dynamic cache. On CUDA the static
# cache lets transformers compile the decode step (CUDA graphs): the issue measured 10.9x for one prompt.
CPU_CACHE_DEFAULT = "dynamic"
CACHE_CHOICES = ("auto", "dynamic", "static")
COMPILE_CHOICES = ("auto", "true", "false")
_COMPILING_DEVICES = ("cuda", "xpu", "mps")  # where transformers compiles a static-cache decode step


@dataclass(frozen=True)
class DecodeSettings:
    """How ``generate`` decodes: the KV cache, whether the decode step is compiled, the batch shapes.

    Build it with :func:`decode_settings`; ``generation.generate_kwargs`` turns it into ``model.generate`` kwargs.

    Attributes:
        cache_implementation: ``dynamic`` (grows per token) or ``static`` (preallocated, compilable).
        compile: let transformers compile the decode step (static cache on CUDA/XPU/MPS only).
        cache_len_step: a static cache is sized in multiples of this many tokens, so calls of similar length
            share one compiled shape (transformers keeps the largest size it has seen).
        batch_sizes: compiled static decoding pads each batch up to the next of these sizes, so only the
            shapes warmed up at load are ever compiled; empty: batches run at their own size.
    """

    cache_implementation: str = "dynamic"
    compile: bool = False
    cache_len_step: int = 256
    batch_sizes: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """What a run, a log line or a benchmark records."""
        return {"cache_implementation": self.cache_implementation, "compile": self.compile,
                "batch_sizes": list(self.batch_sizes)}


DYNAMIC = DecodeSettings()


def supports_static_cache(model) -> bool:
    """Whether transformers can decode ``model`` with a compiled static cache (a plain ``PreTrainedModel`` whose
    architecture declares ``_can_compile_fullgraph``); a ``PeftModel`` with mixed-adapter batches cannot."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and bool(type(model)._can_compile_fullgraph) and \
        type(model)._supports_default_dynamic_cache()


def decode_settings(model, cache_implementation: str = "auto", compile: str | bool = "auto",
                    batch_sizes: tuple[int, ...] | list[int] = ()) -> DecodeSettings:
    """Resolve the ``cache_implementation`` and ``compile`` settings for ``model`` on its device.

    ``auto``: on CUDA (XPU, MPS) the static cache with a compiled decode step where the architecture supports
    it; elsewhere :data:`CPU_CACHE_DEFAULT`, uncompiled. ``static`` and ``dynamic`` force the cache;
    ``compile`` ``true`` needs the static cache on a compiling device, ``false`` never compiles.

    Args:
        model: the loaded model (its device decides ``auto``).
        cache_implementation: ``auto``, ``dynamic`` or ``static``.
        compile: ``auto``, ``true`` or ``false`` (bools accepted).
        batch_sizes: the batch sizes the caller will use (a server's: 1 and its batch size); compiled decoding
            pads batches up to them.

    Raises:
        ValueError: a value outside the choices, or ``compile`` true where it cannot happen.

    Example:
        >>> decode_settings(model, "static", "false").cache_implementation
        'static'
    """
    compile = {True: "true", False: "false"}.get(compile, compile) if isinstance(compile, bool) else compile
    if cache_implementation not in CACHE_CHOICES:
        raise ValueError(f"`cache_implementation` must be one of {', '.join(CACHE_CHOICES)}, got "
                         f"{cache_implementation!r}.")
    if compile not in COMPILE_CHOICES:
        raise ValueError(f"`compile` must be one of {', '.join(COMPILE_CHOICES)}, got {compile!r}.")
    device = next(model.parameters()).device.type
    quantizer = getattr(model, "hf_quantizer", None)  # bitsandbytes 4/8-bit layers do not compile
    can_compile = device in _COMPILING_DEVICES and supports_static_cache(model) and (
        quantizer is None or bool(quantizer.is_compileable))
    cache = cache_implementation
    if cache == "auto":
        cache = "static" if can_compile else CPU_CACHE_DEFAULT if device == "cpu" else "dynamic"
    if compile == "true" and (cache != "static" or device not in _COMPILING_DEVICES):
        raise ValueError(f"`compile` is true, but the decode step compiles only with `cache_implementation` "
                         f"static on {'/'.join(_COMPILING_DEVICES)}; here the cache is {cache} on {device}. "
                         "Set `compile` to auto or false.")
    compiled = cache == "static" and (compile == "true" or (compile == "auto" and can_compile))
    sizes = tuple(sorted({int(b) for b in batch_sizes if int(b) >= 1})) if compiled else ()
    return DecodeSettings(cache, compiled, batch_sizes=sizes)
