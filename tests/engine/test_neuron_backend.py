"""The neuron backend, proven on a CPU stand-in of optimum-neuron's compiled model (no hardware here).

The stand-in's public methods are compared with the installed optimum-neuron classes, so an upstream
API change fails here. Through it, the neuron backend must pass the same greedy and late-insertion
tests as the torch backend, for both compiled shapes (continuous batching → insert; whole-batch
prefill → rebuild).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from neuron_serve.backends.neuron_models import (
    ExportPlan, batch_is_fixed, choose_cached_entry, hub_cache_entries, load_neuron_model, pin_cached_batch,
    runtime_visible_cores,
)
from neuron_serve.config import Config
from neuron_serve.errors import ConfigError
from neuron_serve.loading import build_engine, model_limits, open_neuron_backend
from neuron_serve import sampler
from neuron_serve.model_files import resolve_model_dir
from neuron_serve.tiny_model import TINY_MODEL_ID

from .helpers import request, run, token_ids
from .neuron_standin import NeuronModelStandIn, compile_standin

PROMPTS = ["What is Deep Learning?", "Hello 🚀 世界", "The quick brown fox jumps over the lazy dog.",
           "Q: What is the capital of France?\nA:", "a"]


def neuron_config(model_dir, tmp_path, **settings) -> Config:
    return Config(model_id=str(model_dir), backend="neuron", cache_dir=str(tmp_path / "cache"), **settings)


def neuron_engine(config: Config):
    backend, limits = open_neuron_backend(config, config.model_id, model_class=NeuronModelStandIn)
    return build_engine(config, backend, limits)


# -- the stand-in is optimum-neuron's API -----------------------------------------------------------

REAL_SIGNATURES = textwrap.dedent('''
    import importlib.abc, importlib.machinery, inspect, json, sys, types
    from unittest import mock

    class Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        ROOTS = ("neuronx_distributed", "torch_neuronx", "neuronxcc", "libneuronxla", "torch_xla")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.ROOTS:
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
        def create_module(self, spec):
            module = mock.MagicMock(name=spec.name)
            module.__path__, module.__spec__ = [], spec
            return module
        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Stub())
    from optimum.neuron import NeuronModelForCausalLM
    from optimum.neuron.models.inference.backend.modules.decoder.modeling_decoder import NxDModelForCausalLM

    def describe(fn):
        return [[p.name, str(p.kind), repr(p.default)] for p in inspect.signature(fn).parameters.values()]

    print(json.dumps({
        **{m: describe(getattr(NeuronModelForCausalLM, m)) for m in ("from_pretrained", "export", "get_neuron_config", "save_pretrained")},
        **{m: describe(getattr(NxDModelForCausalLM, m)) for m in ("forward", "reset")},
    }))
''')


def test_standin_methods_have_optimum_neurons_signatures():
    out = subprocess.run([sys.executable, "-c", REAL_SIGNATURES], capture_output=True, text=True, timeout=300, check=True)
    real = json.loads(out.stdout.strip().splitlines()[-1])

    def describe(fn):
        return [[p.name, str(p.kind), repr(p.default)] for p in inspect.signature(fn).parameters.values()]

    for name, params in real.items():
        assert describe(getattr(NeuronModelStandIn, name)) == params, name


# -- greedy equality and late insertion, both compiled shapes ---------------------------------------

@pytest.mark.parametrize("continuous_batching, policy", [(True, "insert"), (False, "rebuild")])
def test_greedy_equals_transformers_with_late_insertions(tiny_model_dir, tokenizer, reference, tmp_path, continuous_batching, policy):
    compiled = compile_standin(tiny_model_dir, tmp_path / "compiled", batch_size=4, sequence_length=128,
                               continuous_batching=continuous_batching)
    engine = neuron_engine(neuron_config(compiled, tmp_path))
    assert engine.scheduler.insertion.name == policy  # `auto` follows the compiled model
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    arrivals = {0: [request(0, ids[0], 12)], 3: [request(1, ids[1], 20), request(2, ids[2], 7)],
                4: [request(3, ids[3], 15)], 9: [request(4, ids[4], 10), request(5, ids[0], 6)]}
    events = run(engine, arrivals)
    for reqs in arrivals.values():
        for req in reqs:
            assert token_ids(events[req.id]) == reference(req.input_ids, req.stopping.max_new_tokens), req.id
    graphs = {graph for graph, _ in engine.backend.model.calls}
    assert graphs == {"context_encoding", "token_generation"}
    prefills = [rows for graph, rows in engine.backend.model.calls if graph == "context_encoding"]
    if continuous_batching:  # only the new rows are prefilled
        assert all(len(rows) <= 2 for rows in prefills)
    else:  # every prefill carries the whole batch
        assert all(rows == [0, 1, 2, 3] for rows in prefills)


def test_a_row_past_the_compiled_context_is_not_rebuilt_and_newcomers_wait_for_it(tiny_model_dir, tokenizer, reference,
                                                                                     tmp_path):
    """A whole-batch model compiled with max_context_length 32 < sequence_length 128 cannot rebuild a row of
    40 tokens: the request that arrives then waits for that row to end, and both come out right."""
    compiled = compile_standin(tiny_model_dir, tmp_path / "compiled", batch_size=2, sequence_length=128,
                               continuous_batching=False, max_context_length=32)
    engine = neuron_engine(neuron_config(compiled, tmp_path, max_input_tokens=32))
    long, late = tokenizer(PROMPTS[0]).input_ids, tokenizer(PROMPTS[3]).input_ids
    events = run(engine, {0: [request("long", long, 60)], 40: [request("late", late, 10)]})
    assert token_ids(events["long"]) == reference(long, 60)
    assert token_ids(events["late"]) == reference(late, 10)
    prefills = [rows for graph, rows in engine.backend.model.calls if graph == "context_encoding"]
    assert len(prefills) == 2  # the late one's waited until the long one ended: no rebuild of it


def test_on_device_sampling_is_used_for_greedy(tiny_model_dir, tokenizer, reference, tmp_path, monkeypatch):
    compiled = compile_standin(tiny_model_dir, tmp_path / "compiled", batch_size=2, sequence_length=128, on_device_sampling=True)
    engine = neuron_engine(neuron_config(compiled, tmp_path))
    assert "on-device sampling" in engine.backend.description

    def host_draw(*args):  # the device drew the token: at a 128k vocabulary a host draw over it cost ~9 ms a row
        raise AssertionError("the host drew a token the device had drawn")

    monkeypatch.setattr(sampler, "_sampled", host_draw)
    prompt = tokenizer(PROMPTS[0]).input_ids
    events = run(engine, {0: [request("g", prompt, 10), request("s", prompt, 10, do_sample=True, top_k=5, seed=1)]})
    assert token_ids(events["g"]) == reference(prompt, 10)
    assert len(events["s"]) == 10 and all(e.token.logprob == 0.0 for e in events["g"] + events["s"])
    assert events["s"][-1].finish.seed is None  # the host's seed was never used: none is reported
    # A temperature and top_p positive but below float32's range would be 0 on the device, which refuses the
    # whole batch's forward; the smallest float32 instead makes the device's draw the top token, greedy.
    cold = dict(do_sample=True, temperature=1e-46, top_p=1e-46, seed=2)
    events = run(engine, {0: [request("g", prompt, 10), request("cold", prompt, 10, **cold)]})
    assert token_ids(events["g"]) == token_ids(events["cold"]) == reference(prompt, 10)


# -- settings checked against the compiled model ----------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"max_batch_size": 8}, "`max_batch_size` (8) must be equal to the compiled model's batch_size (4)"),
    ({"max_total_tokens": 64}, "`max_total_tokens` (64) must be equal to the compiled model's sequence_length (128)"),
    ({"max_input_tokens": 128}, "`max_input_tokens` (128) must be < `max_total_tokens` (128)"),
    ({"export_batch_size": 8}, "HF_BATCH_SIZE (8) must be equal to the compiled model's batch_size (4)"),
    ({"export_sequence_length": 256}, "HF_SEQUENCE_LENGTH (256) must be equal to the compiled model's sequence_length (128)"),
    ({"cores_per_replica": 4}, "`cores_per_replica` (4) must be equal to the compiled model's tp_degree (2)"),
    ({"export_num_cores": 8}, "HF_NUM_CORES (8) must be equal to the compiled model's tp_degree (2)"),
    ({"export_auto_cast_type": "bf16"}, "HF_AUTO_CAST_TYPE (bf16) must match the compiled model's dtype (float32)"),
])
def test_settings_that_disagree_with_the_compiled_model_fail_at_start(tiny_model_dir, tmp_path, settings, message):
    compiled = compile_standin(tiny_model_dir, tmp_path / "compiled", batch_size=4, sequence_length=128)
    with pytest.raises(ConfigError) as error:
        open_neuron_backend(neuron_config(compiled, tmp_path, **settings), compiled, model_class=NeuronModelStandIn)
    assert message in str(error.value)


def test_insert_is_refused_on_a_whole_batch_model(tiny_model_dir, tmp_path):
    compiled = compile_standin(tiny_model_dir, tmp_path / "compiled", batch_size=4, sequence_length=128, continuous_batching=False)
    with pytest.raises(ConfigError, match="`insertion: insert` needs a model that prefills some rows only.*use `insertion: rebuild`"):
        neuron_engine(neuron_config(compiled, tmp_path, insertion="insert"))


def test_limits_derived_from_the_compiled_model_like_neuronx_tgi(tiny_model_dir, tmp_path):
    compiled = compile_standin(tiny_model_dir, tmp_path / "compiled", batch_size=4, sequence_length=128)
    limits = model_limits(neuron_config(compiled, tmp_path), compiled)
    assert (limits.max_batch_size, limits.max_total_tokens, limits.max_input_tokens, limits.max_batch_prefill_tokens) == (4, 128, 64, 256)


def test_a_replica_given_two_cores_by_ray_loads_a_model_compiled_for_two(tiny_model_dir, tmp_path, monkeypatch):
    """Ray writes a replica's cores as a list, which optimum-neuron counts as one core: the backend
    hands the runtime the same cores as a range."""
    compiled = compile_standin(tiny_model_dir, tmp_path / "compiled", batch_size=2, sequence_length=128, tp_degree=2)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "2,3")
    open_neuron_backend(neuron_config(compiled, tmp_path), compiled, model_class=NeuronModelStandIn)
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "2-3"
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0,3")
    with pytest.raises(ConfigError, match="must be contiguous"):
        open_neuron_backend(neuron_config(compiled, tmp_path), compiled, model_class=NeuronModelStandIn)
    assert [runtime_visible_cores(c) for c in ("5", "0-1", "4,5,6,7")] == ["5", "0-1", "4-7"]


def test_without_the_neuron_sdk_the_backend_says_what_to_install(tiny_model_dir, tmp_path):
    compiled = compile_standin(tiny_model_dir, tmp_path / "compiled", batch_size=2, sequence_length=128)
    with pytest.raises(ConfigError, match=r"the neuron backend needs the AWS Neuron SDK.*pip install -e '\.\[neuron\]'"):
        open_neuron_backend(neuron_config(compiled, tmp_path), compiled)


# -- a standard model: compiled at start once, then loaded from the cache ---------------------------

def test_standard_model_is_compiled_once_then_loaded(tiny_model_dir, tokenizer, reference, tmp_path):
    NeuronModelStandIn.export_calls.clear()
    NeuronModelStandIn.load_calls.clear()
    config = neuron_config(tiny_model_dir, tmp_path, export_batch_size=2, export_sequence_length=128, export_num_cores=2,
                           dtype="float32", hf_token="hf_gated")
    prompt = tokenizer(PROMPTS[0]).input_ids
    for _ in range(2):
        backend, limits = open_neuron_backend(config, tiny_model_dir, model_class=NeuronModelStandIn)
        assert (limits.max_batch_size, limits.max_total_tokens) == (2, 128)
        engine = build_engine(config, backend, limits)
        assert token_ids(run(engine, {0: [request("x", prompt, 8)]})["x"]) == reference(prompt, 8)
    assert len(NeuronModelStandIn.export_calls) == 1
    assert NeuronModelStandIn.export_calls[0]["batch_size"] == 2 and NeuronModelStandIn.export_calls[0]["tp_degree"] == 2
    saved = list((tmp_path / "cache" / "compiled").rglob("neuron_config.json"))
    assert len(saved) == 1 and saved[0].parent.name == "b2-s128-tp2-float32"
    # Saved without weights when exported from the hub, it fetches them again: a gated model needs the token.
    assert NeuronModelStandIn.load_calls == [{"path": saved[0].parent, "token": "hf_gated"}]


def test_the_built_in_model_compiles_from_its_own_files_without_asking_the_hub(tmp_path):
    """The KubeRay manifest serves the built-in tiny model on Neuron: its id names no hub repository."""
    NeuronModelStandIn.export_calls.clear()

    def no_hub(plan, token):
        raise AssertionError(f"asked the hub cache for {plan.model_id}")

    config = Config(model_id=TINY_MODEL_ID, backend="neuron", cache_dir=str(tmp_path / "cache"), export_batch_size=2,
                    export_sequence_length=128, dtype="float32")
    model_dir = resolve_model_dir(config)
    assert pin_cached_batch(config.model_copy(update={"export_batch_size": None}), model_dir, no_hub).export_batch_size is None
    model = load_neuron_model(config, model_dir, NeuronModelStandIn, no_hub)
    assert [c["model_id"] for c in NeuronModelStandIn.export_calls] == [str(model_dir)]
    assert model.neuron_config.batch_size == 2


def test_hub_cache_entry_choice_prefers_the_exact_batch_size():
    plan = ExportPlan("org/model", batch_size=4, sequence_length=4096, num_cores=2, dtype="bfloat16")
    entry = lambda b, s=4096, tp=2, dtype="bfloat16": {"batch_size": b, "sequence_length": s, "tp_degree": tp, "torch_dtype": dtype}  # noqa: E731
    assert choose_cached_entry([entry(32), entry(4), entry(8)], plan, batch_is_fixed=True) == entry(4)
    assert choose_cached_entry([entry(32), entry(8)], plan, batch_is_fixed=False) == entry(8)  # smallest larger one
    assert choose_cached_entry([entry(32), entry(8)], plan, batch_is_fixed=True) is None  # pinned: compile
    # Pinned by MAX_BATCH_SIZE, or by HF_BATCH_SIZE, which the ingress sizes itself by.
    assert batch_is_fixed(Config(max_batch_size=4)) and batch_is_fixed(Config(export_batch_size=4))
    assert not batch_is_fixed(Config())
    assert choose_cached_entry([entry(4, s=2048), entry(4, tp=8), entry(4, dtype="float16")], plan, False) is None


class SlowCompiler(NeuronModelStandIn):
    @classmethod
    def export(cls, *args, **kwargs):
        time.sleep(0.5)  # long enough for the other replicas to look for the result meanwhile
        return super().export(*args, **kwargs)


def test_replicas_of_one_node_compile_once_and_load_the_whole_result(tiny_model_dir, tmp_path):
    """On an inf2.48xlarge, 12 replicas start at once: one compiles, the others wait for it, then load
    what it saved (never a folder still being written)."""
    NeuronModelStandIn.export_calls.clear()
    NeuronModelStandIn.load_calls.clear()
    config = neuron_config(tiny_model_dir, tmp_path, export_batch_size=2, export_sequence_length=128, dtype="float32")
    models = []
    replicas = [threading.Thread(target=lambda: models.append(load_neuron_model(config, tiny_model_dir, SlowCompiler)))
                for _ in range(3)]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(60)
    assert len(models) == 3 and all(m.neuron_config.batch_size == 2 for m in models)
    assert all(p.device.type == "cpu" for m in models for p in m.llama.parameters())  # weights, not meta tensors
    assert len(NeuronModelStandIn.export_calls) == 1 and len(NeuronModelStandIn.load_calls) == 2
    [folder] = (tmp_path / "cache" / "compiled").rglob("b2-s128-tp2-float32")
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]  # no partial save left
    assert (folder / "neuron_config.json").is_file()


def test_an_unpinned_batch_size_is_pinned_to_the_caches_once_for_the_whole_app(tiny_model_dir, tmp_path):
    """With no HF_BATCH_SIZE or MAX_BATCH_SIZE, a hub model takes the smallest cached batch size. The app's
    builder pins it, so the ingress's limits and Serve's `max_ongoing_requests` agree with the batchers'."""
    entry = lambda b, dtype="bfloat16": {"batch_size": b, "sequence_length": 128, "tp_degree": 2, "torch_dtype": dtype}  # noqa: E731
    lookup = lambda plan, token: [entry(32), entry(8), entry(4, dtype="float16")]  # noqa: E731
    hub_model = Config(model_id="org/model", backend="neuron", export_sequence_length=128)
    pinned = pin_cached_batch(hub_model, tiny_model_dir, lookup)
    assert pinned.export_batch_size == 8 and model_limits(pinned, tiny_model_dir).max_batch_size == 8
    assert pin_cached_batch(pinned, tiny_model_dir, lookup) is pinned  # the batchers keep it
    assert pin_cached_batch(hub_model.model_copy(update={"max_batch_size": 2}), tiny_model_dir, lookup).export_batch_size is None
    assert pin_cached_batch(hub_model, tiny_model_dir, lambda plan, token: []) is hub_model  # nothing cached: compile
    local = neuron_config(tiny_model_dir, tmp_path, export_sequence_length=128)
    assert pin_cached_batch(local, tiny_model_dir, lookup) is local  # the hub cache knows hub models only


def test_a_hub_model_compiled_at_start_asks_the_hub_cache_once(tiny_model_dir, tmp_path):
    """A batcher built on its own (no app builder to pin the batch size first) pins it, then compiles: the
    cache is asked once for both, the batch size it chose and whether its artifacts are there."""
    asked = []

    def lookup(plan, token):
        asked.append(plan.model_id)
        return [{"batch_size": 8, "sequence_length": 128, "tp_degree": 2, "torch_dtype": "float32"}]

    class FromTheHub(NeuronModelStandIn):  # "org/model"'s files are the tiny model's
        @classmethod
        def export(cls, model_id, neuron_config, **kwargs):
            return super().export(str(tiny_model_dir), neuron_config, **kwargs)

    NeuronModelStandIn.export_calls.clear()
    config = Config(model_id="org/model", backend="neuron", cache_dir=str(tmp_path / "cache"),
                    export_sequence_length=128, dtype="float32")
    model = load_neuron_model(config, tiny_model_dir, FromTheHub, lookup)
    assert model.neuron_config.batch_size == 8 and len(NeuronModelStandIn.export_calls) == 1
    assert asked == ["org/model"]


def test_hub_cache_entries_are_those_for_inf2(monkeypatch):
    """inf2 and trn1 compile for the target trn1; a trn2 entry is of no use here."""
    from optimum.neuron.cache import hub_cache

    found = [{"batch_size": 4, "target": "trn1"}, {"batch_size": 8, "target": "trn2"}, {"batch_size": 16}]
    monkeypatch.setattr(hub_cache, "get_hub_cached_entries", lambda model_id, task=None: found)
    plan = ExportPlan("org/model", batch_size=4, sequence_length=4096, num_cores=2, dtype="bfloat16")
    assert [e["batch_size"] for e in hub_cache_entries(plan, None)] == [4, 16]


def test_settings_that_disagree_with_an_export_fail_before_compiling(tiny_model_dir, tmp_path):
    NeuronModelStandIn.export_calls.clear()
    config = neuron_config(tiny_model_dir, tmp_path, export_num_cores=4, cores_per_replica=2)
    with pytest.raises(ConfigError, match=r"`cores_per_replica` \(2\) must be equal to the compiled model's tp_degree \(4\)"):
        open_neuron_backend(config, tiny_model_dir, model_class=NeuronModelStandIn)
    assert NeuronModelStandIn.export_calls == []
