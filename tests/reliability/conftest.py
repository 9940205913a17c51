"""Apps and clients for the reliability suite.

The apps run the `simulated` backend: each step sleeps as an inf2 core group would (here ~12 ms a
decode step), so streams last long enough to be killed, dropped or drained on purpose, the tokens
are deterministic and never end early, and a dozen replicas cost almost no CPU. Each test module
deploys its own app, so a replica killed or redeployed in one cannot disturb another.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

# One replica process per batcher, CPU only (the main serve app holds the fake NeuronCores).
SIMULATED = {
    "backend": "simulated", "simulated_params": 1e9, "cores_per_replica": 0, "replica_cpus": 0.5,
    "max_batch_size": 4, "max_total_tokens": 1024, "max_input_tokens": 128,
    "health_check_period_s": 1, "health_check_timeout_s": 5, "health_probe_timeout_s": 5,
}
PROMPT = "Once upon a time"


def body(max_new_tokens: int, prompt: str = PROMPT, **parameters) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, **parameters}}


@dataclass
class StreamResult:
    status: int
    tokens: list[dict] = field(default_factory=list)
    final: dict | None = None  # the last event, with `generated_text`
    errors: list[dict] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.final is not None and not self.errors and not self.malformed

    @property
    def failed_cleanly(self) -> bool:
        """Exactly one TGI error event and nothing after it, or an HTTP error in TGI's shape."""
        return (self.status == 200 and len(self.errors) == 1 and self.final is None and not self.malformed) or (
            self.status >= 400 and len(self.errors) == 1
        )


def parse_event(line: str, result: StreamResult) -> None:
    if not line.startswith("data:"):
        return
    try:
        event = json.loads(line[5:])
    except json.JSONDecodeError:
        result.malformed.append(line)
        return
    if result.final is not None or result.errors:
        result.malformed.append(line)  # nothing may follow the last event
    elif "error" in event:
        result.errors.append(event)
    else:
        result.tokens.append(event["token"])
        if event.get("generated_text") is not None:
            result.final = event


async def stream(client: httpx.AsyncClient, url: str, payload: dict, on_token=None) -> StreamResult:
    """A /generate_stream request read to its end; `on_token(result)` may raise to drop the connection."""
    async with client.stream("POST", f"{url}/generate_stream", json=payload) as response:
        result = StreamResult(response.status_code)
        if response.status_code != 200:
            await response.aread()
            result.errors.append(response.json())
            return result
        async for line in response.aiter_lines():
            parse_event(line, result)
            if on_token is not None and result.tokens and line.startswith("data:"):
                on_token(result)
    return result


NEWCOMER_ATTEMPTS = 3


async def newcomer(client: httpx.AsyncClient, url: str):
    """A request as a client behind HAProxy must send it: once more if its kept-alive connection closed
    before any byte of a response. HAProxy closes a client's connection so, for the client to retry,
    when the server connection it reused for the request closed without a response. In a rolling
    update: a request on a stream's connection just freed goes, through the HAProxy process that a
    reload replaced, to the old ingress replica, which, drained, is closing its kept-alive connections
    just then (the replica's log puts the failures of 2 full test runs of 4 in that moment; HAProxy
    logs no such request). The retry may take another such pooled connection and fail the same way
    (twice in a row in 1 full run of 3), so a client sends it up to NEWCOMER_ATTEMPTS times."""
    for attempt in range(1, NEWCOMER_ATTEMPTS + 1):
        try:
            return await stream(client, url, body(10))
        except httpx.RemoteProtocolError as error:
            if "without sending a response" not in str(error) or attempt == NEWCOMER_ATTEMPTS:
                raise


async def streaming(client: httpx.AsyncClient, url: str, n: int, max_new_tokens: int) -> list[asyncio.Task]:
    """Start `n` streams and return once each has its first token: they are all mid-generation."""
    started = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(stream(client, url, body(max_new_tokens), on_token=lambda r, e=e: e.set()))
             for e in started]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    return tasks


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/info", timeout=30).json()["replicas"]


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} did not hold within {timeout}s")


def all_rows_free(url: str) -> bool:
    found = replicas(url)
    return bool(found) and all(r["active"] == 0 and r["waiting"] == 0 for r in found)


def run(coro):
    return asyncio.run(coro)
