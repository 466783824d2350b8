"""The generation scheduler in-process, on the offline tiny models: rows that join and leave between tokens
give solo generate's greedy tokens, a closed stream frees its row at the next token, requests with different
params share forwards, and chat requests reach the model in its training format."""

from __future__ import annotations

import threading

import pytest

PROMPTS = ["The food was", "Our waiter brought", "I would come back because", "Great", "Service was slow and"]


@pytest.fixture(scope="module")
def tiny(demo_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(demo_model_dir).eval(), AutoTokenizer.from_pretrained(demo_model_dir)


def _ids(tok, prompt: str) -> list[int]:
    return tok(prompt, add_special_tokens=not prompt.startswith(tok.bos_token))["input_ids"]


@pytest.mark.parametrize("params", [{}, {"repetition_penalty": 1.3}])
def test_rows_joining_and_leaving_between_tokens_give_solo_greedy_tokens(tiny, params):
    from smolora_mlflow.models.generation import generate, resolve_params
    from smolora_mlflow.models.row_batch import Row, RowBatch, eos_ids

    model, tok = tiny
    lengths = [16, 5, 12, 9, 20]  # rows leave at different steps, and the cache is re-cut as they do
    want = [generate(model, tok, [p], max_new_tokens=n, **params)[0] for p, n in zip(PROMPTS, lengths, strict=True)]
    rows = [Row(_ids(tok, p), resolve_params({"max_new_tokens": n, **params}), eos_ids(model, tok))
            for p, n in zip(PROMPTS, lengths, strict=True)]
    batch = RowBatch(model, tok.pad_token_id)
    batch.add(rows[:2])
    joins = {2: rows[2:4], 6: rows[4:]}  # new rows join a running batch, with caches of other lengths
    step = 0
    while batch.rows or joins:
        step += 1
        batch.add(joins.pop(step, []))
        batch.keep([r.finish is None for r in batch.rows])
        batch.step()
        batch.keep([r.finish is None for r in batch.rows])
    assert [tok.decode(r.generated, skip_special_tokens=True) for r in rows] == want
    assert [len(r.generated) for r in rows] == lengths and {r.finish for r in rows} == {"length"}


def _wrapper(model_dir, tmp_path, **config):
    import mlflow

    from smolora_mlflow import flavor

    flavor.save_model(tmp_path / "m", model_dir, pip_requirements=["torch", "transformers"])
    return mlflow.pyfunc.load_model(str(tmp_path / "m"), model_config=config)._model_impl


def test_a_closed_stream_frees_its_row_at_the_next_token_and_others_go_on(demo_model_dir, tmp_path, tiny):
    from smolora_mlflow.models.generation import generate

    wrapper = _wrapper(demo_model_dir, tmp_path)
    seen: list[int] = []
    scheduler = wrapper.scheduler
    step = scheduler._batch.step

    def counting_step() -> None:  # the rows each forward ran (observed, not changed)
        seen.append(len(scheduler._batch.rows))
        step()

    scheduler._batch.step = counting_step
    long = wrapper.open_stream("The food was", {"max_new_tokens": 400})
    other = wrapper.open_stream("Great", {"max_new_tokens": 40})
    next(long)
    long.close()  # the client went away
    rest = "".join(other)
    assert rest == generate(*tiny, ["Great"], max_new_tokens=40)[0]
    assert other.result.finish_reason == "length" and len(other.result.token_ids) == 40
    # The long stream's row left within a token of the close: the other row ran alone after that.
    assert len(seen) <= 45 and seen.count(2) <= 6, seen


def test_requests_with_different_params_share_forwards_and_usage_counts_generated_ids(demo_model_dir, tmp_path,
                                                                                      tiny):
    from smolora_mlflow.models.generation import generate

    wrapper = _wrapper(demo_model_dir, tmp_path, coalesce_window_ms=300)
    asks = [("The food was", {"max_new_tokens": 12}), ("Great", {"max_new_tokens": 5, "repetition_penalty": 1.2}),
            ("Our waiter brought", {"max_new_tokens": 9, "return_full_text": True})]
    got: dict[int, list] = {}
    barrier = threading.Barrier(len(asks))

    def ask(i: int) -> None:
        barrier.wait()
        got[i] = wrapper.complete_results(wrapper.prepare(asks[i][0], asks[i][1]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (prompt, params) in enumerate(asks):
        plain = {k: v for k, v in params.items() if k != "return_full_text"}
        assert got[i][0].text == generate(*tiny, [prompt], **plain)[0]
        assert len(got[i][0].token_ids) == params["max_new_tokens"] and got[i][0].finish_reason == "length"
    assert wrapper.stats.batches == 1 and wrapper.stats.largest_batch == 3  # one admission, one running batch


def test_seeded_sampling_runs_as_its_own_generate_call(demo_model_dir, tmp_path, tiny):
    from smolora_mlflow.models.generation import generate

    wrapper = _wrapper(demo_model_dir, tmp_path)
    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.3, "seed": 11}
    assert wrapper.complete(PROMPTS[:2], sampled) == generate(*tiny, PROMPTS[:2], **sampled)
    assert "".join(wrapper.open_stream(PROMPTS[0], sampled)) == generate(*tiny, PROMPTS[:1], **sampled)[0]


def test_auto_prompt_format_decides_from_the_template_and_generation_config(tiny):
    from transformers import GenerationConfig

    from smolora_mlflow.models.generation import decide_prompt_format

    _, tok = tiny
    # The demo's template ends turns with the generic {{ eos_token }}: nothing says it was tuned to chat.
    assert decide_prompt_format("auto", tok, "some/folder")[0] == "plain"
    chat_tok = tok.__class__.from_pretrained(tok.name_or_path)
    chat_tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat_tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    end_of_turn = chat_tok.convert_tokens_to_ids("<|im_end|>")
    fmt, why = decide_prompt_format("auto", chat_tok, "/models/my-finetune", GenerationConfig(eos_token_id=end_of_turn))
    assert fmt == "chat" and "<|im_end|>" in why  # a folder name without "instruct" no longer decides it
    base = GenerationConfig(eos_token_id=chat_tok.eos_token_id)  # a base model with a borrowed template
    assert decide_prompt_format("auto", chat_tok, "/models/my-finetune", base)[0] == "plain"
    assert decide_prompt_format("auto", chat_tok, "org/Model-Instruct", base)[0] == "chat"


def test_chat_requests_reach_a_plain_model_as_its_training_prompts(demo_model_dir, tmp_path, tiny):
    from mlflow.exceptions import MlflowException

    from smolora_mlflow.models.generation import generate

    wrapper = _wrapper(demo_model_dir, tmp_path)
    assert wrapper.prompt_format == "plain"
    user = [{"role": "user", "content": "The food was"}]
    assert wrapper.complete({"messages": user}, {"max_new_tokens": 6}) == generate(*tiny, ["The food was"],
                                                                                   max_new_tokens=6)
    with pytest.raises(MlflowException, match="trained on plain prompts") as e:
        wrapper.complete({"messages": [{"role": "system", "content": "Be brief."}, *user]})
    assert "/v1/completions" in str(e.value)


def test_stream_text_is_the_tokenizers_decode_row_by_row(tiny):
    """Streams decode all rows in one backend call; it must give exactly what ``tokenizer.decode`` gives,
    special tokens and byte fallback included, and fall back to ``decode`` where a tokenizer cleans up spaces."""
    from smolora_mlflow.flavor.scheduler import GenerationScheduler

    model, tok = tiny
    sched = GenerationScheduler(model, tok, tokenizer_lock=threading.Lock())
    assert sched._decode_batch is not None  # the demo's fast tokenizer takes the batched path
    rows = [[*_ids(tok, p), tok.eos_token_id, tok.pad_token_id] for p in PROMPTS] + [[], list(range(len(tok)))]
    want = [tok.decode(ids, skip_special_tokens=True) for ids in rows]
    assert sched._texts(rows) == want
    tok.clean_up_tokenization_spaces = True
    try:
        assert GenerationScheduler._backend_decode_batch(tok) is None
    finally:
        tok.clean_up_tokenization_spaces = False


def test_interpreter_exit_stops_the_scheduler_thread_after_its_step(demo_model_dir, tmp_path):
    """The atexit hook ends a running scheduler thread and waits for it (a daemon thread caught in a torch op by
    finalization aborts the process); a stream still in flight fails with the reason, later requests are refused."""
    from smolora_mlflow.flavor import scheduler as sched

    wrapper = _wrapper(demo_model_dir, tmp_path)
    assert wrapper.predict({"prompt": ["The food was"]}, params={"max_new_tokens": 3}) is not None
    thread = wrapper.scheduler._thread
    assert thread is not None and thread.is_alive() and wrapper.scheduler in sched._RUNNING
    stream = wrapper.open_stream("Great", {"max_new_tokens": 400})
    next(stream)
    sched._stop_running_schedulers()
    assert not thread.is_alive() and wrapper.scheduler._thread is None
    with pytest.raises(RuntimeError, match="interpreter is exiting"):
        "".join(stream)
    with pytest.raises(RuntimeError, match="interpreter is exiting"):
        wrapper.predict({"prompt": ["Great"]}, params={"max_new_tokens": 2})
