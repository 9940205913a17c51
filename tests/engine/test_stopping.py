"""Stopping: length, EOS from the generation config, stop sequences on text, the total-length cap."""

from __future__ import annotations

import json
import shutil

import pytest

from neuron_serve.model_files import eos_token_ids, load_tokenizer
from neuron_serve.request import FinishReason, StoppingParams
from neuron_serve.stopping import StopCondition

from .helpers import make_engine, request, run, token_ids


def condition(stop=(), max_new=100, eos=frozenset({99}), input_length=3, max_total=1000):
    return StopCondition(StoppingParams(max_new, tuple(stop)), eos, input_length, max_total)


def test_order_is_length_then_eos_then_stop_sequence():
    c = condition(stop=["x"], max_new=2)
    assert c.check(1, 1, "a") is None
    assert c.check(99, 2, "x") == FinishReason.LENGTH
    assert condition(stop=["x"]).check(99, 1, "x") == FinishReason.EOS_TOKEN
    assert condition(stop=["x"]).check(5, 1, "ax") == FinishReason.STOP_SEQUENCE


def test_stop_sequence_split_across_tokens_or_inside_one():
    c = condition(stop=["Paris"])
    assert [c.check(1, i, t) for i, t in enumerate(["The capital is P", "ar", "is."], 1)] == [
        None, None, FinishReason.STOP_SEQUENCE]
    assert condition(stop=["is"]).check(1, 1, " this") == FinishReason.STOP_SEQUENCE
    c = condition(stop=["abc"])
    assert c.check(1, 1, "ab") is None and c.check(1, 2, "") is None and c.check(1, 3, "c") == FinishReason.STOP_SEQUENCE
    c = condition(stop=["abc d"])  # the text so far is shorter than the stop sequence less one character
    assert c.check(1, 1, "abc") is None and c.check(1, 2, " d") == FinishReason.STOP_SEQUENCE


def test_a_stop_sequence_can_name_a_special_token(engine, tokenizer, reference):
    """As in TGI, whose stop sequences see special tokens' text: `stop: ["<|eot_id|>"]` ends a turn
    whose end is not among the model's EOS ids. The token's event carries its text, as TGI's does;
    `generated_text` leaves it out."""
    prompt = tokenizer("What is Deep Learning?").input_ids
    full = reference(prompt, 20)
    k = next(i for i, t in enumerate(full) if t in tokenizer.all_special_ids)  # the tiny model emits one
    stop = tokenizer.convert_ids_to_tokens(full[k])
    events = run(engine, {0: [request("s", prompt, 20, stop=[stop])]})["s"]
    assert token_ids(events) == full[: k + 1] and events[-1].finish.reason == FinishReason.STOP_SEQUENCE
    assert events[-1].token.special and events[-1].token.text == stop
    assert events[-1].finish.generated_text == "".join(e.token.text for e in events[:-1])


def test_total_length_caps_max_new_tokens():
    c = condition(max_new=50, input_length=8, max_total=10)
    assert c.check(1, 1, "") is None and c.check(1, 2, "") == FinishReason.LENGTH


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer):
    return make_engine(tiny_model_dir, tokenizer, batch_size=2, max_total_tokens=64)


def test_stop_sequence_in_the_engine_keeps_the_stop_text(engine, tokenizer, reference):
    prompt = tokenizer("What is Deep Learning?").input_ids
    full = reference(prompt, 20)
    pieces = [tokenizer.decode(full[:k], skip_special_tokens=True) for k in range(len(full) + 1)]
    # A stop string that ends inside the 6th token's text.
    text6 = pieces[6]
    stop = text6[len(pieces[5]) - 2 : len(text6) - 0] if len(text6) - len(pieces[5]) >= 1 else text6[-2:]
    events = run(engine, {0: [request("s", prompt, 20, stop=[stop])]})["s"]
    assert events[-1].finish.reason == FinishReason.STOP_SEQUENCE
    assert token_ids(events) == full[: len(events)]
    assert stop in events[-1].finish.generated_text
    assert stop not in tokenizer.decode(full[: len(events) - 1], skip_special_tokens=True)


def test_max_new_tokens_and_total_length(engine, tokenizer):
    prompt = tokenizer("Hello").input_ids
    assert len(run(engine, {0: [request("n", prompt, 5)]})["n"]) == 5
    long_prompt = tokenizer("The quick brown fox jumps over the lazy dog. Pack my box").input_ids
    events = run(engine, {0: [request("t", long_prompt, 500)]})["t"]
    assert len(long_prompt) <= 32 and len(long_prompt) + len(events) == 64
    assert events[-1].finish.reason == FinishReason.LENGTH


def test_the_tokenizers_eos_stays_when_the_generation_config_names_another(tiny_model_dir, tmp_path):
    """A fine-tune that set the tokenizer's EOS (ChatML's `<|im_end|>`) but kept its base model's single
    id in generation_config.json still ends its turns."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = load_tokenizer(model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert eos_token_ids(model_dir, tokenizer) == {0, tokenizer.eos_token_id}
    (model_dir / "generation_config.json").unlink()
    (model_dir / "config.json").write_text(json.dumps({**json.loads((model_dir / "config.json").read_text()),
                                                       "eos_token_id": None}))
    assert eos_token_ids(model_dir, tokenizer) == {tokenizer.eos_token_id}


def test_eos_ids_come_from_the_generation_config(tiny_model_dir, tmp_path, reference):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompt = tokenizer("What is Deep Learning?").input_ids
    expected = reference(prompt, 20)
    eos = expected[6]
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"][0], eos]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    assert eos in eos_token_ids(model_dir, tokenizer)

    engine = make_engine(model_dir, tokenizer, batch_size=2)
    events = run(engine, {0: [request("e", prompt, 20)]})["e"]
    first = expected.index(eos)
    assert token_ids(events) == expected[: first + 1]
    assert events[-1].finish.reason == FinishReason.EOS_TOKEN
    # As in TGI, `special` is the tokenizer's (this EOS id is a word), and the event has its text;
    # `generated_text` leaves an EOS id out all the same.
    assert not events[-1].token.special and events[-1].token.text
    assert events[-1].finish.generated_text == tokenizer.decode(expected[:first], skip_special_tokens=True)
    assert events[-1].finish.generated_text == "".join(e.token.text for e in events[:-1])
