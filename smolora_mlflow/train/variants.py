"""LoRA variants whose adapter only makes sense against a changed base: PiSSA, OLoRA, CorDA, LoRA-GA.

These initialise the adapter from the base weights and subtract it from them, so the trained adapter belongs
to a *residual* base that no one else has. PEFT converts such an adapter into a plain LoRA (of rank 2r) on
the original base at save time, given the adapter as it was before the first step
(``save_pretrained(path_initial_model_for_weight_conversion=...)``). The run then packages, merges and
serves it like any LoRA adapter, referencing the untouched base model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

INITIAL_ADAPTER_DIR = "adapter_initial"
_CONVERTED_PREFIXES = ("pissa", "olora", "corda", "lora_ga")


def needs_conversion(peft_options: dict[str, Any]) -> bool:
    """Whether ``init_lora_weights`` makes an adapter of a residual base (PiSSA, OLoRA, CorDA, LoRA-GA)."""
    init = peft_options.get("init_lora_weights")
    return isinstance(init, str) and init.lower().startswith(_CONVERTED_PREFIXES)


class InitialAdapterCallback(TrainerCallback):
    """Saves the adapter before the first step (once: a resumed run keeps the first session's)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None or (self.out_dir / "adapter_config.json").is_file():
            return
        config = model.peft_config["default"]
        init = config.init_lora_weights
        config.init_lora_weights = True  # PEFT's recipe: the initial adapter is saved as a plain LoRA
        try:
            model.save_pretrained(self.out_dir, safe_serialization=True)
        finally:
            config.init_lora_weights = init


def save_adapter(model, out_dir: Path, initial_dir: Path | None) -> None:
    """Save ``model``'s adapter; converted into a LoRA of the original base when ``initial_dir`` is given."""
    if initial_dir is None:
        model.save_pretrained(out_dir, safe_serialization=True)
        return
    with warnings.catch_warnings():
        # PEFT warns that PiSSA changes the base and suggests converting it: this call is that conversion.
        warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
        model.save_pretrained(out_dir, safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(initial_dir))
