"""The torch sampler's static-shape decode (static_decode.StaticDecoder) against the eager one, on
CPU where the same code runs without CUDA graphs; on a CUDA device, graph replay against the same
steps run eagerly."""

import contextlib

import pytest
import torch
from kvcache import KVCache, StaticStep
from model import Transformer
from rollout import fsdp_named_tensors
from sampler import TorchSampler
from static_decode import StaticDecoder

PROMPTS = [[5, 6, 7], list(range(3, 40)), [9] * 12, [40, 41, 42, 43]]
# ~1 token in 24 stops a row; 10**6: beyond the vocabulary
STOPS = list(range(0, 384, 24)) + [10**6]
SETTINGS = [dict(temperature=0),
            dict(temperature=1.0, logprobs=True),
            dict(temperature=0.7, top_k=20, top_p=0.9)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    return Transformer.from_pretrained(tiny_qwen3).eval()


@pytest.fixture
def small_buckets(monkeypatch):
    """8-slot length buckets, so that short tests cross several windows (and several graphs)."""
    monkeypatch.setattr(StaticDecoder, "LEN_BUCKET", 8)


def record_shapes(monkeypatch):
    """The (batch bucket, window) of every decode step, and the batch buckets rows moved to."""
    seen = {"steps": [], "rebucket": []}
    step, retire = StaticDecoder.step, StaticDecoder.retire

    def step_(self, B, W):
        seen["steps"].append((B, W))
        return step(self, B, W)

    def retire_(self, live, B, *a):
        nb = retire(self, live, B, *a)
        if nb != B:
            seen["rebucket"].append((B, nb))
        return nb
    monkeypatch.setattr(StaticDecoder, "step", step_)
    monkeypatch.setattr(StaticDecoder, "retire", retire_)
    return seen


def assert_same(a, b, lp_tol=1e-5):
    """Same tokens and finishes; log-probs equal up to float rounding (other shapes, other
    kernels)."""
    assert [[s.tokens for s in r] for r in a] == [[s.tokens for s in r] for r in b]
    assert [[s.finish for s in r] for r in a] == [[s.finish for s in r] for r in b]
    if a[0][0].logprobs is not None:
        logprobs_a = [[s.logprobs for s in r] for r in a]
        logprobs_b = [[s.logprobs for s in r] for r in b]
        torch.testing.assert_close(logprobs_a, logprobs_b, atol=lp_tol, rtol=0)


@pytest.mark.parametrize("kw", SETTINGS)
@pytest.mark.parametrize("sync_every", [1, 3])
def test_static_equals_eager(model, small_buckets, monkeypatch, kw, sync_every):
    """Greedy and seeded sampling: the static path gives the eager path's samples token for token,
    across length buckets and while finished rows leave by re-bucketing."""
    eager = TorchSampler(model=model, decode="eager")
    static = TorchSampler(model=model, decode="static", sync_every=sync_every)
    seen = record_shapes(monkeypatch)
    args = dict(n=3, max_new_tokens=30, seed=7, **kw)
    a = eager.generate(PROMPTS, stop_ids=STOPS, **args)
    b = static.generate(PROMPTS, stop_ids=STOPS, **args)
    assert_same(a, b)
    # rows stop at different steps: the batch shrinks from 16 (12 rows) on
    if kw["temperature"] > 0:
        assert seen["rebucket"] and seen["rebucket"][0][0] == 16
        assert {s.finish for r in b for s in r} == {"stop", "length"}
    seen["steps"].clear()
    assert_same(eager.generate(PROMPTS, stop_ids=[], **args),
                static.generate(PROMPTS, stop_ids=[], **args))
    # slots 37 + 1 ... 37 + 29
    assert sorted({W for _, W in seen["steps"]}) == [40, 48, 56, 64, 72]


def test_rows_decode_as_they_would_alone(model, small_buckets):
    """Left padding, batch padding and the other rows change nothing."""
    static = TorchSampler(model=model, decode="static")
    greedy = static.generate(PROMPTS, n=2, temperature=0, max_new_tokens=16, stop_ids=[])
    for p, rows in zip(PROMPTS, greedy):
        alone = static.generate([p], temperature=0, max_new_tokens=16, stop_ids=[])
        assert alone[0][0].tokens == rows[0].tokens
    # sampled: a row's noise depends on its place (prompt index * n + sample index), not on the
    # batch
    kw = dict(n=3, temperature=1.0, max_new_tokens=16, stop_ids=STOPS, seed=5, logprobs=True)
    batch = static.generate(PROMPTS, **kw)
    assert_same(static.generate(PROMPTS[:1], **kw), batch[:1])
    assert_same(static.generate(PROMPTS[:3], **kw), batch[:3])


def test_more_rows_than_fit_decode_in_turns(model, monkeypatch):
    monkeypatch.setattr(StaticDecoder, "MAX_ROWS", 4)
    static = TorchSampler(model=model, decode="static", sync_every=2)
    kw = dict(n=3, temperature=1.0, max_new_tokens=10, stop_ids=STOPS, seed=11, logprobs=True)
    b = static.generate(PROMPTS, **kw)
    assert static.static.rows == 4
    assert_same(TorchSampler(model=model, decode="eager").generate(PROMPTS, **kw), b)


def test_decoder_is_kept_between_calls_and_across_sleep_when_it_fits(model):
    static = TorchSampler(model=model, decode="static")
    static.generate(PROMPTS, n=2, temperature=0, max_new_tokens=8)
    dec = static.static
    assert dec.rows == 8 and dec.max_len == StaticDecoder.LEN_BUCKET  # 37 + 8 tokens fit one bucket
    # fewer rows, as long: kept
    static.generate(PROMPTS[:1], n=3, temperature=1.0, max_new_tokens=100)
    assert static.static is dec
    static.generate(PROMPTS, n=1, temperature=0, max_new_tokens=300)  # longer rows: a larger cache
    assert static.static is not dec and static.static.max_len == 512
    dec = static.static
    # its size by hand: k and v of every layer, valid flags, tokens (int64), log-probs (fp32)
    c = model.config
    kv = 2 * c.num_hidden_layers * dec.rows * c.num_key_value_heads * 512 * c.head_dim * 4
    assert dec.nbytes() == kv + dec.rows * 512 * (1 + 8 + 4)
    static.sleep()  # a few hundred kB, far below 0.3 of the machine's memory: kept, graphs and all
    assert static.static is dec
    # rows and length it holds: reused
    static.generate(PROMPTS, n=1, temperature=0, max_new_tokens=8)
    assert static.static is dec
    # no share to keep anything in: freed for the trainer, rebuilt by the next call
    small = TorchSampler(model=model, decode="static", gpu_memory_utilization=0.0)
    greedy = dict(n=2, temperature=0, max_new_tokens=8)
    before = small.generate(PROMPTS, **greedy)
    small.sleep()
    assert small.static is None
    assert small.generate(PROMPTS, **greedy) == before


def test_update_weights_reach_a_kept_decoder(model, tiny_qwen3, tiny_qwen3_b):
    """Weights are copied in place, so a kept decoder (and its graphs, on CUDA) decodes with the
    new ones."""
    own = TorchSampler(tiny_qwen3, decode="static", device="cpu")  # beside the CPU eager run below
    before = own.generate(PROMPTS, temperature=0, max_new_tokens=8, stop_ids=[])
    dec = own.static
    other = Transformer.from_pretrained(tiny_qwen3_b).eval()
    own.update_weights(fsdp_named_tensors(other))
    after = own.generate(PROMPTS, temperature=0, max_new_tokens=8, stop_ids=[])
    assert own.static is dec and after != before
    eager = TorchSampler(model=other, decode="eager")
    assert after == eager.generate(PROMPTS, temperature=0, max_new_tokens=8, stop_ids=[])


def test_static_cache_step_equals_eager_cache_step(model):
    """kvcache.py's static-shape step (StaticStep over a window) = its eager cached step, on the
    logits."""
    T, steps = 6, 5
    idx = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()
    eager = KVCache(model, 2, T + steps)
    # spare rows and slots
    static = KVCache(model, 4, 16)
    slot = torch.tensor([T])
    with torch.no_grad():
        a = model(idx, attention_mask=mask, cache=eager, last_only=True)
        b = model(idx, attention_mask=mask, cache=static.narrow(2), last_only=True)
        for _ in range(steps):
            nxt = a[:, -1].argmax(-1)[:, None]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            a = model(nxt, cache=eager)
            b = model(nxt, cache=StaticStep(static, 2, window=16, slot=slot))
    assert slot.item() == T + steps
    assert static.next_pos[:2].tolist() == [4 + steps, 6 + steps]
    assert static.len == 0
    assert eager.len == T + steps
    with pytest.raises(ValueError, match="one token per row"):
        model(idx, cache=StaticStep(static, 2, window=16, slot=slot))


def test_static_step_has_no_host_sync():
    """What a CUDA graph records must not read data on the host (.item(), .tolist(), nonzero(), a
    data-dependent shape): under fake tensors, which hold no data, any such op raises. Checked on
    CPU for the CUDA path, top-p included: the CPU runs the GPU's code."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    from model import ModelConfig
    cfg = ModelConfig(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16)
    with torch.inference_mode(), FakeTensorMode():
        dec = StaticDecoder(Transformer(cfg).eval(), 8, 512, 100, graphs=False)
        dec.start((0, -1, 1.0, False), torch.tensor([5]), key=1, place=list(range(8)))
        for settings in [(0, -1, 1.0, False), (1.0, -1, 1.0, True), (0.7, 10, 0.9, True)]:
            dec.settings = settings
            dec.forward_and_sample(4, 256)
        with pytest.raises(DataDependentOutputException):
            dec.done[:4].tolist()  # the host sync retire() does between steps


class FakeCuda:
    """Stand-ins for torch.cuda's stream and graph calls, on a CPU: each logs (call, device it acts
    on), the device it was given or else the current one, as torch.cuda takes it.
    torch.cuda.device(d) sets the current device; cuda:0 when none is set."""

    def __init__(self, monkeypatch):
        self.log = []
        self.current = [torch.device("cuda", 0)]
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = torch.device(device) if device is not None else fake.current[-1]
                fake.log.append(("Stream", self.device))

            def wait_stream(self, other):
                fake.log.append(("wait_stream", self.device))
                fake.log.append(("wait_stream", other.device))

        class CUDAGraph:
            def replay(self):
                fake.log.append(("replay", fake.current[-1]))

        @contextlib.contextmanager
        def device(d):
            self.current.append(torch.device(d))
            yield
            self.current.pop()

        @contextlib.contextmanager
        def stream(s):
            self.log.append(("stream", s.device))
            yield

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None):
            # without a stream, torch.cuda.graph captures on a side stream of the current device
            self.log.append(("graph", stream.device if stream is not None else self.current[-1]))
            self.log.append(("capture", self.current[-1]))
            yield

        def current_stream(device=None):
            s = Stream.__new__(Stream)
            s.device = torch.device(device) if device is not None else self.current[-1]
            self.log.append(("current_stream", s.device))
            return s

        for name, f in dict(Stream=Stream, CUDAGraph=CUDAGraph, device=device, stream=stream,
                            graph=graph, current_stream=current_stream,
                            graph_pool_handle=lambda: object()).items():
            monkeypatch.setattr(torch.cuda, name, f)


def test_graphs_are_recorded_and_replayed_on_the_models_device(model, monkeypatch):
    """With the model on cuda:1 and cuda:0 current (a rank before set_device), every stream, capture
    and replay must act on cuda:1: captured on the current device, a graph records none of the
    model's kernels and replays nothing, silently. Checked with fake CUDA calls; the step itself
    runs on the CPU."""
    fake = FakeCuda(monkeypatch)
    decoder = StaticDecoder(model, 4, 16, model.config.vocab_size, graphs=True)
    # the model's device as the CUDA calls see it (the buffers stay on the CPU)
    decoder.device = torch.device("cuda", 1)
    decoder.start((1.0, -1, 1.0, False), torch.tensor([5]), key=1, place=list(range(4)))
    decoder.step(2, 16)
    decoder.step(2, 16)
    calls = [call for call, _ in fake.log]
    assert "capture" in calls and "replay" in calls and "Stream" in calls
    assert len(decoder.recorded) == 1
    wrong = [(call, d) for call, d in fake.log if d != torch.device("cuda", 1)]
    assert not wrong, f"CUDA calls made off the model's device: {wrong}"


def test_decode_argument(model):
    with pytest.raises(ValueError, match="unknown decode"):
        TorchSampler(model=model, decode="fast")
    if not next(model.parameters()).is_cuda:
        assert TorchSampler(model=model).decode == "eager"  # the CPU default
        with pytest.raises(ValueError, match="CUDA"):
            TorchSampler(model=model, decode="graph")


# ----------------------------------------------------------------------------- CUDA graphs

@pytest.fixture(scope="module")
def cuda_model(tiny_qwen3):
    return Transformer.from_pretrained(tiny_qwen3, device="cuda").eval()


@cuda
@pytest.mark.parametrize("kw", SETTINGS)
def test_graph_replay_equals_static_eager(cuda_model, small_buckets, monkeypatch, kw):
    """Recorded and replayed steps give what the same steps give run one kernel at a time (fp32),
    across windows, re-bucketing and repeated calls (the second call replays graphs recorded by the
    first)."""
    static = TorchSampler(model=cuda_model, decode="static", sync_every=3)
    graph = TorchSampler(model=cuda_model, decode="graph", sync_every=3)
    assert TorchSampler(model=cuda_model).decode == "graph"  # the CUDA default
    args = dict(n=3, max_new_tokens=30, stop_ids=STOPS, seed=7, **kw)
    a = static.generate(PROMPTS, **args)
    seen = record_shapes(monkeypatch)
    b = graph.generate(PROMPTS, **args)
    assert_same(a, b)
    assert {k[:2] for k in graph.static.recorded} == set(seen["steps"])  # one graph per step shape
    n_graphs = len(graph.static.recorded)
    assert_same(a, graph.generate(PROMPTS, **args))  # replays only
    assert len(graph.static.recorded) == n_graphs
    free = dict(args, stop_ids=[], seed=8)
    assert_same(static.generate(PROMPTS, **free), graph.generate(PROMPTS, **free))
    assert {k[1] for k in graph.static.recorded} >= {40, 48, 56, 64, 72}
    # and the eager path (other attention kernels): the same samples, but for a rare near-tie
    c = TorchSampler(model=cuda_model, decode="eager").generate(PROMPTS, **args)
    same = sum(x.tokens == y.tokens for r, q in zip(b, c) for x, y in zip(r, q))
    assert same >= len(PROMPTS) * 3 - 3


@cuda
def test_graph_bf16_and_weight_updates(tiny_qwen3, tiny_qwen3_b):
    """bf16 (the GPU default dtype): graphs = the static path's eager steps, over 256-slot windows;
    after update_weights the graphs recorded before decode with the new weights; sleep() keeps them
    when they fit the sampler's share of the GPU (this small decoder does), and frees them when
    not."""
    graph = TorchSampler(tiny_qwen3, decode="graph")
    static = TorchSampler(tiny_qwen3, decode="static")
    assert next(graph.model.parameters()).dtype == torch.bfloat16
    args = dict(n=4, temperature=1.0, top_p=0.95, max_new_tokens=300, stop_ids=STOPS, seed=1,
                logprobs=True)
    assert_same(static.generate(PROMPTS, **args), graph.generate(PROMPTS, **args))
    # 4 rows, one 256-slot window: one graph
    greedy = dict(temperature=0, max_new_tokens=40, stop_ids=[])
    before = graph.generate(PROMPTS, **greedy)
    assert before == static.generate(PROMPTS, **greedy)
    n_graphs = len(graph.static.recorded)
    other = Transformer.from_pretrained(tiny_qwen3_b)
    graph.update_weights(fsdp_named_tensors(other))
    static.update_weights(fsdp_named_tensors(other))
    after = graph.generate(PROMPTS, **greedy)
    assert len(graph.static.recorded) == n_graphs  # replayed, not recorded again
    assert after != before and after == static.generate(PROMPTS, **greedy)
    graph.sleep()  # kept: the next call replays the graphs recorded before
    assert graph.static is not None and graph.generate(PROMPTS, **greedy) == after
    assert len(graph.static.recorded) == n_graphs
    graph.keep_share = 0.0  # nothing may stay: freed, and rebuilt by the next call
    graph.sleep()
    assert graph.static is None and graph.generate(PROMPTS, **greedy) == after


@cuda
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_graph_at_qwen_head_shapes(model_type):
    """Qwen2.5-1.5B's attention shapes (12 query heads on 2 kv heads of 128) in bf16: graphs =
    eager steps."""
    from model import ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(model_type=model_type, vocab_size=1000, hidden_size=256,
                      intermediate_size=512, num_hidden_layers=2, num_attention_heads=12,
                      num_key_value_heads=2, head_dim=128)
    m = Transformer(cfg).to("cuda", torch.bfloat16).eval()
    prompts = [list(range(1, 300)), [5, 6, 7]]  # rows 300 slots apart: windows of 512 and more
    args = dict(n=8, temperature=1.0, max_new_tokens=300, stop_ids=[0, 500], seed=3)
    a = TorchSampler(model=m, decode="static").generate(prompts, **args)
    graph = TorchSampler(model=m, decode="graph")
    assert_same(a, graph.generate(prompts, **args))
    assert {k[1] for k in graph.static.recorded} == {512, 768}
