"""generation.py on the offline tiny models: batching is invisible, streaming adds up, seeds repeat."""

from __future__ import annotations

import threading

import pytest

PROMPTS = [
    "The food was",
    "x",
    "Our waiter brought the wrong order twice, and then",
    "I would come back because the pasta was amazing and the",
    "Great",
]


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(demo_model_dir), AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    # Untied embeddings: greedy outputs vary token by token, so a padding bug would show.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_batch_equals_single_greedy(which, request):
    from smolora_mlflow.models.generation import generate

    model, tok = request.getfixturevalue(which)
    single = [generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=8)
    small_batches = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    assert batched == single
    assert small_batches == single
    assert all(isinstance(t, str) and t for t in single)
    if which == "tiny":
        assert len(set(single)) == len(single)  # distinct prompts, distinct completions


def test_greedy_ids_match_plain_transformers(tiny):
    from smolora_mlflow.models.generation import generate

    model, tok = tiny
    enc = tok("The food was", return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=10, do_sample=False)
    expected = tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert generate(model, tok, ["The food was"], max_new_tokens=10) == [expected]


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_stream_pieces_join_to_generate(which, request):
    from smolora_mlflow.models.generation import generate, stream

    model, tok = request.getfixturevalue(which)
    for prompt in PROMPTS[:3]:
        pieces = list(stream(model, tok, prompt, max_new_tokens=12))
        assert len(pieces) > 1 or " " not in pieces[0]  # the streamer emits word by word
        assert "".join(pieces) == generate(model, tok, [prompt], max_new_tokens=12)[0]


def test_stream_holds_the_lock_and_reraises_errors(tiny):
    from smolora_mlflow.models.generation import stream

    model, tok = tiny
    lock = threading.Lock()
    it = stream(model, tok, "The food was", lock=lock, max_new_tokens=4)
    assert "".join(it)
    assert not lock.locked()
    with pytest.raises(Exception, match=r"max_new_tokens|must be"):
        list(stream(model, tok, "The food was", max_new_tokens=-3))
    with pytest.raises(TypeError, match="must be a string"):
        list(stream(model, tok, ["a list"]))


def test_return_full_text(tiny):
    from smolora_mlflow.models.generation import generate, stream

    model, tok = tiny
    short = generate(model, tok, PROMPTS, max_new_tokens=6)
    full = generate(model, tok, PROMPTS, max_new_tokens=6, return_full_text=True)
    assert full == [p + s for p, s in zip(PROMPTS, short, strict=True)]
    assert "".join(stream(model, tok, PROMPTS[0], max_new_tokens=6, return_full_text=True)) == full[0]


def test_seeded_sampling_is_reproducible(tiny):
    from smolora_mlflow.models.generation import generate

    model, tok = tiny
    kw = {"max_new_tokens": 16, "do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 1.0}
    a = generate(model, tok, PROMPTS[:2], seed=123, **kw)
    b = generate(model, tok, PROMPTS[:2], seed=123, **kw)
    c = generate(model, tok, PROMPTS[:2], seed=7, **kw)
    greedy = generate(model, tok, PROMPTS[:2], max_new_tokens=16)
    assert a == b
    assert a != c
    assert a != greedy


def test_bad_arguments(tiny):
    from smolora_mlflow.models.generation import generate, resolve_params

    model, tok = tiny
    assert generate(model, tok, []) == []
    with pytest.raises(TypeError, match="list of strings"):
        generate(model, tok, "one prompt")
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, ["a"], batch_size=0)
    with pytest.raises(ValueError, match=r"Unknown generation parameter\(s\) \['max_tokens'\]"):
        resolve_params({"max_tokens": 3})


def test_format_chat(demo_model_dir):
    from transformers import AutoTokenizer

    from smolora_mlflow.models.generation import format_chat

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    text = format_chat(tok, [{"role": "user", "content": "Hi"}])
    assert text == "<|user|>Hi</s><|assistant|>"
    with pytest.raises(ValueError, match="role"):
        format_chat(tok, [{"content": "no role"}])
    with pytest.raises(ValueError, match="non-empty list"):
        format_chat(tok, [])
    plain = AutoTokenizer.from_pretrained(demo_model_dir)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        format_chat(plain, [{"role": "user", "content": "Hi"}])


def test_resolve_device():
    import torch

    from smolora_mlflow.models.generation import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert resolve_device("auto").type == "cuda"
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu-please")
