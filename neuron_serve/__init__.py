"""neuron-serve's engine: one static batch with prefill-time insertion, with no Ray and no HTTP.

The layers, in the order a request meets them: `config` (one typed object) → `request` (what a
caller asks for, what comes back) → `scheduler` (prefill or decode, which rows) → `backends`
(the forward pass) → `sampler` → `stopping` and `detokenizer` → `engine` (the step that ties them)
→ `async_engine` (the step loop in a thread, events to asyncio callers).
"""

__version__ = "0.1.0"
