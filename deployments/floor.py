"""A yardstick, not part of the product: the least an app shaped like ours can add to a request.

It crosses the processes neuron-serve's requests cross (HAProxy, an HTTP ingress deployment, a Serve
call to a second deployment and back) with the same Serve settings (`ray_env.SERVE_ENV`), and does
nothing else: no validation, no tokenizer, no engine. `scripts/bench.py --side-by-side` serves it
right after neuron-serve and times it at one stream, so the idle TTFT that the serving path adds can
be read against what these hops alone cost on the same host. `import_path: deployments.floor:app`.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself on a method of a Serve ingress.
import json

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from .ray_env import SERVE_ENV

http = FastAPI()
OPTIONS = {"ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": SERVE_ENV}}}


@serve.deployment(**OPTIONS)
class NoOpBatcher:
    async def generate(self, body: dict) -> int:
        return len(body.get("inputs", ""))


@serve.deployment(**OPTIONS)
@serve.ingress(http)
class NoOpIngress:
    def __init__(self, batcher: DeploymentHandle):
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


app = NoOpIngress.bind(NoOpBatcher.bind())
