"""Streaming detokenization: the pieces always add up to `tokenizer.decode` of all generated ids (special
tokens included, as TGI streams them); `generated_text` leaves special tokens out and keeps a leading space."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuron_serve.detokenizer import IncrementalDetokenizer, generated_text


def stream(tokenizer, prompt_ids, generated):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.add(i) for i in generated]
    return pieces, detok.flush()


@pytest.mark.parametrize("text", [
    " Hello world, how are you?",
    "emoji: 🙂🚀🔥❤️ and more 🎉",
    "中文：你好，世界！今天天气很好",
    "日本語と한국어 mixed with English and Ελληνικά",
    "  leading and   multiple   spaces\n\nnew lines\ttabs",
    "accents: é à ü ß ñ ç — “quotes” …",
])
def test_pieces_concatenate_to_decode(tokenizer, text):
    prompt = tokenizer("Say something:").input_ids
    generated = tokenizer(text, add_special_tokens=False).input_ids
    pieces, tail = stream(tokenizer, prompt, generated)
    assert "".join(pieces) + tail == tokenizer.decode(generated, skip_special_tokens=False) == text
    assert tail == ""  # complete text: nothing is held back at the end
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_character_is_held_until_complete(tokenizer):
    generated = tokenizer("🙂", add_special_tokens=False).input_ids
    assert len(generated) > 1, "the tiny tokenizer splits this emoji into byte tokens"
    pieces, _ = stream(tokenizer, [], generated)
    assert pieces[:-1] == [""] * (len(generated) - 1) and pieces[-1] == "🙂"


def test_special_tokens_stream_their_own_text_and_generated_text_leaves_them_out(tokenizer):
    ids = tokenizer("<|im_start|>hi<|im_end|> there", add_special_tokens=False).input_ids
    pieces, tail = stream(tokenizer, [], ids)
    assert "".join(pieces) + tail == "<|im_start|>hi<|im_end|> there"
    assert "<|im_end|>" in pieces
    assert generated_text(tokenizer, [], ids) == "hi there"


def test_generated_text_keeps_the_space_a_sentencepiece_tokenizer_drops_from_a_lone_word():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "▁The": 2, "▁capital": 3, "▁is": 4, "▁Paris": 5, ".": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    prompt, generated = [1, 2, 3, 4], [5, 6]
    assert tokenizer.decode(generated) == "Paris."  # alone, the first word loses its space
    assert generated_text(tokenizer, prompt, generated) == " Paris."
    pieces, tail = stream(tokenizer, prompt, generated)
    assert "".join(pieces) + tail == " Paris."


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_id_sequence_concatenates_to_decode(tokenizer, data):
    vocab = len(tokenizer)
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=8))
    generated = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=30))
    pieces, tail = stream(tokenizer, prompt, generated)
    assert "".join(pieces) + tail == tokenizer.decode(generated, skip_special_tokens=False)
