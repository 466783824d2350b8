"""The offline demo: a tiny Llama-architecture base model and a bundled dataset of restaurant reviews.

Nothing here touches a model hub. The tokenizer is trained with `tokenizers` on the bundled corpus and
the model is initialised from a fixed seed, so every machine builds byte-identical weights. The result
is saved once with ``save_pretrained`` into a cache folder keyed by a hash of the recipe, and the rest
of the package loads it through the ordinary ``from_pretrained(path)`` path.

Example:
    >>> from smolora_mlflow.models.demo import demo_model_path
    >>> path = demo_model_path()          # builds in a few seconds the first time, then cached
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from smolora_mlflow.config import DEMO_DATASET, DEMO_MODEL
from smolora_mlflow.models.cache import cache_root

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEMO_CORPUS = DATA_DIR / "reviews.jsonl"
# Preference pairs over the same reviews (a good vs a bad adjective): the demo data of DPO, KTO and GRPO.
DEMO_PREFERENCES = DATA_DIR / "preferences.jsonl"

# Small enough to train in seconds on 2 CPU cores, big enough to learn the review templates.
DEMO_MODEL_SPEC = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "seed": 0,
    "recipe_version": 1,
}
SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def is_demo_dataset(name: object) -> bool:
    return isinstance(name, str) and name == DEMO_DATASET


def demo_texts() -> list[str]:
    """The bundled corpus, one review per row."""
    with DEMO_CORPUS.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _recipe_hash() -> str:
    h = hashlib.sha256(json.dumps(DEMO_MODEL_SPEC, sort_keys=True).encode())
    h.update(DEMO_CORPUS.read_bytes())
    return h.hexdigest()[:16]


def demo_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the demo base model, building it on first use.

    Args:
        cache_dir: where to cache it; defaults to ``$SMOLORA_CACHE`` or ``~/.cache/smolora_mlflow``.

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.
    """
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"demo-model-{_recipe_hash()}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename, so a concurrent or interrupted build never leaves half a
    # model where a reader would find it.
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root))
    try:
        build_demo_model(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Built the offline demo model at %s", target)
    return target


def build_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]
    specials += ["<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=DEMO_MODEL_SPEC["max_position_embeddings"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_demo_model(out_dir: str | os.PathLike) -> Path:
    """Build the demo tokenizer and a freshly initialised tiny Llama, and save both to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = DEMO_MODEL_SPEC
    tokenizer = build_tokenizer(demo_texts(), spec["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        rms_norm_eps=spec["rms_norm_eps"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=32,
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        f"# {DEMO_MODEL}\n\nA randomly initialised {spec['num_hidden_layers']}-layer Llama "
        f"({sum(p.numel() for p in model.parameters()):,} parameters) with a BPE tokenizer trained on the "
        "bundled restaurant reviews. Built offline by smolora_mlflow.models.demo for demos and tests.\n",
        encoding="utf-8",
    )
    return out
