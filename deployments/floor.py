"""A yardstick, not part of the product: the least an app shaped like ours can add to a request.

It crosses the processes neuron-serve's requests cross (HAProxy, an HTTP ingress deployment, a Serve
call to a second deployment and back) with the same Serve settings (`ray_env.SERVE_ENV`), and does
nothing else: no validation, no tokenizer, no engine. Its second deployment answers after `wait_ms`
(0 unless its app's args say), as a batcher answers after a prefill: a host's processes that sleep
through one wake up slower than ones that were just busy. `scripts/bench.py --side-by-side` serves it
right after neuron-serve, without and with a wait as long as the engine's idle TTFT, and times both
at one stream, so the idle TTFT that the serving path adds can be read against what these hops alone
cost on the same host. `import_path: deployments.floor:app` (no wait) or `deployments.floor:build_app`.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself on a method of a Serve ingress.
import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from .ray_env import SERVE_ENV, keep_request_lines_off_stderr

http = FastAPI()
OPTIONS = {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": SERVE_ENV}}}


@serve.deployment(**OPTIONS)
class NoOpBatcher:
    def __init__(self, wait_s: float):
        keep_request_lines_off_stderr()
        self.wait_s = wait_s

    async def generate(self, body: dict) -> int:
        if self.wait_s:
            await asyncio.sleep(self.wait_s)
        return len(body.get("inputs", ""))


@serve.deployment(**OPTIONS)
@serve.ingress(http)
class NoOpIngress:
    def __init__(self, batcher: DeploymentHandle):
        keep_request_lines_off_stderr()
        self.batcher = batcher

    @http.get("/health")
    async def health(self) -> None:
        return None

    @http.post("/generate_stream")
    async def generate_stream(self, request: Request) -> StreamingResponse:
        """One TGI event, the last: its token id is the length of `inputs`, as the second deployment counted it."""
        token = await self.batcher.generate.remote(await request.json())
        event = {"index": 1, "token": {"id": token, "text": "", "logprob": 0.0, "special": False},
                 "top_tokens": None, "generated_text": "", "details": None}

        async def events():
            yield f"data:{json.dumps(event)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def build_app(args: dict):
    """`args`: {"wait_ms": how long the second deployment takes to answer} (default 0)."""
    return NoOpIngress.bind(NoOpBatcher.bind(float(args.get("wait_ms", 0)) / 1000))


app = build_app({})
