"""Stock clients work unchanged against the Ray Serve app: text-generation, huggingface_hub, openai."""

from __future__ import annotations

import pytest

from ..conftest import load_script

PROMPT = "What is Deep Learning?"
N = 10


@pytest.fixture(scope="module")
def greedy_text(tokenizer, reference):
    return tokenizer.decode(reference(tokenizer(PROMPT).input_ids, N), skip_special_tokens=True)


@pytest.fixture(scope="module")
def greedy_raw_text(tokenizer, reference):
    """With the special tokens' own texts (the tiny model emits one), as TGI streams them."""
    return tokenizer.decode(reference(tokenizer(PROMPT).input_ids, N), skip_special_tokens=False)


@pytest.fixture(scope="module")
def greedy_chat_text(tokenizer, reference):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return tokenizer.decode(reference(ids, N), skip_special_tokens=True)


def test_text_generation_client(app, greedy_text):
    from text_generation import Client

    client = Client(app, timeout=60)
    response = client.generate(PROMPT, max_new_tokens=N)
    assert response.generated_text == greedy_text
    assert response.details.finish_reason == "length" and response.details.generated_tokens == N
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=N))
    assert "".join(r.token.text for r in streamed if not r.token.special) == greedy_text  # as clients of TGI do
    assert streamed[-1].generated_text == greedy_text and streamed[-1].details.generated_tokens == N


def test_text_generation_client_sees_typed_errors(app):
    from text_generation import Client
    from text_generation.errors import ValidationError

    with pytest.raises(ValidationError, match="`inputs` tokens \\+ `max_new_tokens` must be <= 256"):
        Client(app, timeout=60).generate(PROMPT, max_new_tokens=1000)


def test_huggingface_hub_inference_client(app, greedy_text, greedy_raw_text, greedy_chat_text):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=app, timeout=60)
    # TGI's `/` answers with the prompt too for a text-generation model; the client passes it through.
    assert client.text_generation(PROMPT, max_new_tokens=N) == PROMPT + greedy_text
    assert client.text_generation(PROMPT, max_new_tokens=N, return_full_text=False) == greedy_text
    detailed = client.text_generation(PROMPT, max_new_tokens=N, details=True, return_full_text=False)
    assert detailed.generated_text == greedy_text and len(detailed.details.tokens) == N
    pieces = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True, return_full_text=False))
    assert "".join(pieces) == greedy_raw_text  # every token's text, as from TGI
    events = list(client.text_generation(PROMPT, max_new_tokens=N, stream=True, details=True, return_full_text=False))
    assert events[-1].details.generated_tokens == N and events[-1].generated_text == greedy_text

    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat_completion(messages, max_tokens=N, temperature=0)
    assert chat.choices[0].message.content == greedy_chat_text
    chunks = list(client.chat_completion(messages, max_tokens=N, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy_chat_text


def test_openai_sdk(app, greedy_text, greedy_raw_text, greedy_chat_text):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app}/v1", api_key="unused", timeout=60)
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="tgi", messages=messages, max_tokens=N, temperature=0)
    assert chat.choices[0].message.content == greedy_chat_text and chat.usage.completion_tokens == N
    stream = client.chat.completions.create(model="tgi", messages=messages, max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == greedy_chat_text

    completion = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=N, temperature=0)
    assert completion.choices[0].text == greedy_text
    stream = client.completions.create(model="tgi", prompt=PROMPT, max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == greedy_raw_text  # TGI streams every token's text
    assert [m.id for m in client.models.list()] == ["neuron-serve/tiny-llama"]


def test_the_load_generators_streams(app, tokenizer, reference, greedy_chat_text):
    """scripts/bench.py's own clients: TGI's stream and OpenAI's, every token counted; a refusal is an error."""
    import asyncio

    bench = load_script("bench")
    job = bench.Job(PROMPT, tuple(tokenizer(PROMPT).input_ids), N, 0.0)
    too_long = bench.Job(PROMPT, job.prompt_ids, 10_000, 0.0)

    async def main():
        async with bench.http_target(bench.TGIStream, "tgi", app) as tgi:
            counts = [n async for n in tgi.stream(job)]
            with pytest.raises(bench.TargetError, match="validation"):  # TGI streams the error as an event
                [n async for n in tgi.stream(too_long)]
        async with bench.http_target(bench.OpenAIChatStream, "openai", app, model="tgi", tokenizer=tokenizer) as chat:
            chat_counts = [n async for n in chat.stream(job)]
        return counts, chat_counts, chat.seen

    counts, chat_counts, seen = asyncio.run(main())
    greedy = reference(tokenizer(PROMPT).input_ids, N)
    tokens = [0 if t in tokenizer.all_special_ids else 1 for t in greedy]
    assert sum(counts) == sum(tokens) and 0 < len(counts) <= len(tokens)  # a piece per network read
    assert sum(chat_counts) == len(tokenizer(greedy_chat_text, add_special_tokens=False).input_ids) > 0
    assert seen == {PROMPT}
