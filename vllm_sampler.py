"""
rollout.py's vLLM backend: VLLMSampler, an engine in this process's reach whose weights are
reloaded in place from the trainer's tensors, through vLLM internals that move between releases
(checked at start); the engine's arguments and environment; the logit bias that keeps it off the
embedding's padding rows. rollout.py's make_sampler() is the way in; the top of rollout.py says
what this backend does.
"""
import contextlib
import importlib
import logging
import os
from typing import Iterable, Iterator

import torch

from model import resolve_checkpoint
from sampling import (Sample, check_generate_args, checkpoint_stop_ids, dist_info, hash32, mix_seed,
                      sample_places)
from tokenizer import read_json

# vLLM logs every prefix-cache reset at INFO: a training log wants its warnings only, and not two
# that do not apply (RoPE has no checkpoint weights, reported at every reload; its chat-template
# warm-up, a template we never use)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
QUIET_VLLM = (
    ("vllm.model_executor.model_loader.reload.layerwise", "RotaryEmbedding: Failed to load"),
    ("vllm.renderers.base", "Chat template warmup"))
for _logger, _message in QUIET_VLLM:
    logging.getLogger(_logger).addFilter(lambda record, m=_message: m not in record.getMessage())

# vLLM's V2 model runner takes at most this many logit-bias ids per request
MAX_LOGIT_BIAS_IDS = 1024


def padding_bias(hf_config, n_tokens):
    """The logit bias that keeps vLLM from drawing the embedding's padding rows past the tokenizer's
    n_tokens ids: -inf on each (None when there are none, or n_tokens is not given)."""
    rows = hf_config.get("vocab_size") or hf_config.get("text_config", {}).get("vocab_size")
    if n_tokens is None or rows is None or n_tokens >= rows:
        return None
    if rows - n_tokens > MAX_LOGIT_BIAS_IDS:
        raise ValueError(f"the model has {rows - n_tokens} embedding rows past its tokenizer's "
                         f"{n_tokens} tokens; vLLM masks at most {MAX_LOGIT_BIAS_IDS} per request: "
                         "use the torch backend")
    return {i: float("-inf") for i in range(n_tokens, rows)}


def vllm_device_type():
    """The device type vLLM's installed build runs on ('cuda', 'cpu', ...); None if vLLM does not
    import."""
    try:
        from vllm.platforms import current_platform
        return current_platform.device_type or None
    # not installed, or a build for another device
    except Exception:
        return None


def checkpoint_tensors(path) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint folder's (name, tensor) pairs, read one at a time: the start-up sync's
    weights."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ----------------------------------------------------------------------------- the vLLM backend

# the release the weight sync was written and tested against (requirements-gpu.txt)
VLLM_WRITTEN_FOR = "0.32.0"
# module -> what this file uses from it, checked before an engine starts
VLLM_INTERNALS = {
    "vllm": ("LLM.collective_rpc", "LLM.sleep", "LLM.wake_up", "LLM.reset_prefix_cache",
             "LLM.enqueue", "SamplingParams"),
    "vllm.config": ("set_current_vllm_config",),
    "vllm.model_executor.model_loader.reload.layerwise": ("initialize_layerwise_reload",
                                                          "finalize_layerwise_reload"),
    "vllm.v1.engine.core_client": ("InprocClient",),
}
# a started LLM
ENGINE_INTERNALS = ("llm_engine.engine_core.shutdown", "llm_engine.vllm_config.model_config.dtype",
                    "llm_engine.step", "llm_engine.has_unfinished_requests")
# each engine worker
WORKER_INTERNALS = ("vllm_config", "model_runner.get_model", "model_runner.model_config")


class VLLMVersionError(RuntimeError):
    """The installed vLLM lacks an internal the weight sync uses, or the start-up sync failed: one
    line."""

    def __init__(self, problem):
        import vllm
        super().__init__(f"vLLM {vllm.__version__}: {' '.join(str(problem).split())[:500]}; "
                         f"rollout.py's in-place weight sync was written against vLLM "
                         f"{VLLM_WRITTEN_FOR} (requirements-gpu.txt)")


def missing_attrs(obj, dotted_names):
    """The names of dotted_names ('a.b.c') that obj does not have."""
    def has(o, parts):
        return not parts or hasattr(o, parts[0]) and has(getattr(o, parts[0]), parts[1:])
    return [name for name in dotted_names if not has(obj, name.split("."))]


def missing_vllm_internals():
    """VLLM_INTERNALS that the installed vLLM lacks, as module.name."""
    missing = []
    for module, names in VLLM_INTERNALS.items():
        try:
            m = importlib.import_module(module)
        except ImportError:
            missing.append(module)
            continue
        missing += [f"{module}.{name}" for name in missing_attrs(m, names)]
    return missing


class WeightSyncExtension:
    """Methods that vLLM mixes into its worker class (worker_extension_cls) and that run inside
    every engine worker, called through llm.collective_rpc. One weight update = begin, one load per
    bucket, finish.

    They drive vLLM's in-place layerwise reload (vllm/model_executor/model_loader/reload): begin
    puts each layer's parameters back into checkpoint format, load_weights takes HF-named tensors
    (fusing q/k/v and gate/up, sharding for tensor parallelism), and a layer is post-processed (the
    CPU build repacks linear weights for oneDNN) and copied into the kernel tensors as soon as all
    its weights have arrived, so the engine's memory and CUDA-graph pointers stay where they were.
    Plain model.load_weights would write checkpoint-format tensors into repacked ones.
    """

    def oprd_missing_internals(self):
        return missing_attrs(self, WORKER_INTERNALS)

    def oprd_model_runner(self):
        """[is it vLLM's V2 model runner, its class]: the runner this worker built (vLLM's
        Worker.use_v2_model_runner, read from vllm_config.use_v2_model_runner at its start)."""
        runner = type(self.model_runner)
        return [bool(getattr(self, "use_v2_model_runner", False)),
                f"{runner.__module__}.{runner.__qualname__}"]

    def oprd_begin_update(self):
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def oprd_load_weights(self, payload):
        """payload: safetensors bytes (engine in another process) or a list of (name, tensor) (same
        process)."""
        from safetensors.torch import load
        from vllm.config import set_current_vllm_config
        weights = list(load(payload).items()) if isinstance(payload, bytes) else payload
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            model.load_weights(weights)
            # a tied LM head is its own layer in vLLM and load_weights skips it: hand it the new
            # embedding too, or the reload would put its old (stale) kernel tensor back
            if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
                for name, t in weights:
                    if name == "model.embed_tokens.weight":
                        p = model.lm_head.weight
                        if hasattr(p, "weight_loader"):
                            p.weight_loader(p, t)
                        else:
                            p.data.copy_(t)
        return len(weights)

    def oprd_finish_update(self):
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.model_runner.model_config)


def engine_args(model_path, hf_config, device_type, world=1, gpu_memory_utilization=None,
                tensor_parallel_size=1, enable_sleep_mode=None, seed=0, max_model_len=None,
                dtype=None, local_world=None, **kw):
    """vLLM's LLM(...) arguments for a checkpoint (its folder and config.json) on a device type,
    'cuda' or 'cpu', with world ranks, local_world of them on this node (default: torchrun's
    LOCAL_WORLD_SIZE, else world); kw (max_num_seqs, enforce_eager, ...) passes through. Starts
    nothing, so tests check them on any machine."""
    on_gpu = device_type == "cuda"
    # never vLLM's 'auto': fp16 or bf16 by vLLM version for an fp32 checkpoint
    if dtype in (None, "auto"):
        # on CPU the checkpoint's dtype: vLLM's CPU build would downcast an fp32 checkpoint to bf16
        stored = hf_config.get("dtype") or hf_config.get("torch_dtype") or "auto"
        dtype = "bfloat16" if on_gpu else stored
    limit = hf_config.get("max_position_embeddings")
    # vLLM refuses a context beyond the model's
    if max_model_len and limit and max_model_len > limit:
        max_model_len = limit
    if gpu_memory_utilization is None and on_gpu:
        # colocated with the trainer on the rank's own GPU: leave it most of the memory
        gpu_memory_utilization = 0.3
    elif gpu_memory_utilization is None:
        # On a CPU the share is of the node's RAM, and every rank's engine takes all of its own:
        # without VLLM_CPU_KVCACHE_SPACE, vLLM 0.32's CPU worker (v1/worker/cpu_worker.py,
        # determine_available_memory) makes its KV cache the share of the NUMA node minus the
        # process's resident memory, zeroed at start, so two ranks at 0.5 each would ask for the
        # whole node between them. Half the RAM is divided among the node's ranks: one rank keeps
        # what it had, and the node stays at half whatever the number of ranks (vLLM's 0.92 refuses
        # to start once others hold a little). A fixed small KV space would bound it too, but vLLM
        # refuses to start when max_model_len does not fit in the cache, and a space that fits a
        # real model's context is too much for many ranks. VLLM_CPU_KVCACHE_SPACE (GiB per engine),
        # when set, replaces the share.
        if local_world is None:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        gpu_memory_utilization = 0.5 / local_world
    sleep_mode = on_gpu if enable_sleep_mode is None else enable_sleep_mode
    extension = f"{__name__}.WeightSyncExtension"
    args = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode,
                # ids in, ids out: no tokenizer needed (the byte task has none)
                skip_tokenizer_init=True,
                logprobs_mode="raw_logprobs", enable_prefix_caching=True,
                worker_extension_cls=extension)
    if world > 1:
        args["distributed_executor_backend"] = "external_launcher"
    return {**args, **kw}


def engine_env(device_type, world):
    """The environment variables a vLLM engine starts with, where the user has not set them.

    One process alone (no torchrun) on CUDA or a CPU keeps the engine core in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), as external_launcher does under torchrun by itself: so one
    GPU and eight take the same path, the student's tensors handed to the engine with no copy. A
    core in a child process (vLLM's default) would get each step's weights through CPU
    serialisation (3.3 GiB for a 1.5B model) and make a second CUDA context; on a CPU it spawns
    its worker too, each importing torch and vLLM again (24 s to start a tiny model, against 6 s
    here). Under torchrun nothing is set: on a CPU the variable hangs the ranks' engines."""
    if world == 1 and device_type in ("cuda", "cpu"):
        return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return {}


# what torchrun tells its workers: hidden from an engine's child processes (outside_torchrun)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
                      "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


@contextlib.contextmanager
def outside_torchrun(device, n_devices=1):
    """While an engine of its own starts: torchrun's variables hidden, so its child processes start
    a world of their own, and on a GPU only this rank's device and the n_devices - 1 after it (a
    tensor-parallel engine's) visible to them (else they would take the node's first)."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ)
              if k in TORCHRUN_VARIABLES or k.startswith("TORCHELASTIC_")}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cuda":
        physical = visible.split(",") if visible else [str(i) for i in
                                                       range(torch.cuda.device_count())]
        first = device.index or 0
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical[first:first + n_devices])
    try:
        yield
    finally:
        os.environ.update(hidden)
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


class VLLMSampler:
    """A vLLM engine in this process's reach (see the top of the file for what it does).

    Alone, the engine core runs in this process (engine_env; VLLM_ENABLE_V1_MULTIPROCESSING=1 keeps
    vLLM's child process, where weights travel as safetensors bytes in the engine's dtype).
    Under torchrun (WORLD_SIZE > 1) each rank builds its own engine with
    distributed_executor_backend="external_launcher": the engine lives in the rank's own process,
    on the rank's device (LOCAL_RANK), reuses the torch.distributed group (tensor parallelism spans
    consecutive ranks), and weights are handed over as tensors with no copy. Call close() before
    dist.destroy_process_group(): vLLM's teardown then destroys the default group itself, so guard
    that call with dist.is_initialized().
    With own_world=True (distill.py's sampler ranks, where the training ranks start no engine) the
    engine is a world of one: its core and worker run in child processes (vLLM's default), which
    start with torchrun's variables hidden and, on a GPU, only this rank's device visible. An
    engine in this process, or external_launcher, would build its groups over the
    torch.distributed world, which the ranks without an engine never join: a hang. Its weights
    arrive as serialised buckets (as for any core in a child process).

    At start rank 0 prints one line (summary()): device, dtype, where the engine core runs, and
    which model runner vLLM picked. On CUDA vLLM 0.32 picks its V2 model runner whenever Triton is
    present; VLLM_USE_V2_MODEL_RUNNER=0 falls back to the V1 runner (the CPU build runs V1).
    """

    def __init__(self, model_path, device=None, bucket_mb=256, n_tokens=None, dp_rank=None,
                 own_world=False, **engine_kw):
        from vllm import LLM
        runs_on = vllm_device_type()
        device = torch.device(device or runs_on or "cpu")
        # e.g. the CPU tests on a GPU node: no CUDA engine for them
        if device.type != runs_on:
            raise ValueError(f"the vLLM sampler was asked for device {device}, but this vLLM build "
                             f"runs on {runs_on}: use the torch backend there")
        missing = missing_vllm_internals()
        if missing:
            raise VLLMVersionError(f"no {', '.join(missing)}")
        # a hub id: downloaded once, here
        model_path = resolve_checkpoint(model_path)
        # an engine of its own (a sampler rank of distill.py, beside ranks that never start one): a
        # world of one, its core and workers (tp of them) in child processes, which never see
        # torchrun's world
        rank, world = (0, 1) if own_world else dist_info()
        tp = engine_kw.get("tensor_parallel_size", 1)
        if world % tp and not own_world:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the {world} ranks")
        self.dp_rank = rank // tp if dp_rank is None else dp_rank
        self.dp_size = world // tp
        hf_config = read_json(os.path.join(model_path, "config.json"))
        self.padding_bias = padding_bias(hf_config, n_tokens)
        args = engine_args(model_path, hf_config, device.type, world, **engine_kw)
        self.device = device
        self.sleep_mode = args["enable_sleep_mode"]
        if own_world:
            # in this process the engine would build its groups over the torch.distributed world,
            # which the other ranks never join: a hang
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        for name, value in engine_env(device.type, world).items():
            os.environ.setdefault(name, value)
        if own_world:
            engine_start = outside_torchrun(device, tp)
        else:
            engine_start = contextlib.nullcontext()
        with engine_start:
            self.llm = LLM(**args)
        self.stop_ids = checkpoint_stop_ids(model_path)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.asleep = False
        self.synced_at_start = self.check_weight_sync(model_path)
        if rank == 0:
            print(self.summary(), flush=True)

    def check_weight_sync(self, model_path):
        """Fail now, in one line, if the weight sync cannot work with this vLLM: the internals it
        uses in the engine and its workers, then one sync of the engine's own weights (read again).
        Returns the tensors loaded."""
        from vllm.v1.engine.core_client import InprocClient
        try:
            missing = missing_attrs(self.llm, ENGINE_INTERNALS)
            in_workers = self.llm.collective_rpc("oprd_missing_internals")
            missing += sorted({m for worker in in_workers for m in worker})
            if missing:
                raise AttributeError(f"no {', '.join(missing)}")
            self.in_process = isinstance(self.llm.llm_engine.engine_core, InprocClient)
            self.dtype = self.llm.llm_engine.vllm_config.model_config.dtype
            self.runner_v2, self.runner = self.llm.collective_rpc("oprd_model_runner")[0]
            return self.update_weights(checkpoint_tensors(model_path))
        except Exception as e:
            # a failed check: free the engine, report the check's error
            with contextlib.suppress(Exception):
                self.close()
            if isinstance(e, AttributeError):
                problem = str(e)
            else:
                problem = f"the start-up weight sync failed: {e}"
            raise VLLMVersionError(problem) from e

    def summary(self):
        """The line printed at start: what the engine runs, and the runner's fallback."""
        import vllm
        dtype = str(self.dtype).removeprefix("torch.")
        where = "in this process" if self.in_process else "its core in a child process"
        line = (f"rollout: vLLM {vllm.__version__} engine on {self.device.type}, {dtype}, {where}, "
                f"model runner {'V2' if self.runner_v2 else 'V1'} ({self.runner})")
        if self.runner_v2:
            line += "; VLLM_USE_V2_MODEL_RUNNER=0 falls back to V1"
        return line

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=256,
                 stop_ids=None, seed=0, logprobs=False, places=None, on_sample=None):
        """As TorchSampler.generate; on_sample(i, j, sample) is called as each request finishes,
        while the engine goes on with the others (LLM.generate's own loop over engine steps, with a
        hand-over)."""
        from vllm import SamplingParams
        check_generate_args(prompts, n, temperature, top_p, max_new_tokens)
        self.wake()
        stop = list(self.stop_ids if stop_ids is None else stop_ids)
        key = mix_seed(seed, self.dp_rank if places is None else 0)
        place = sample_places(len(prompts), n, places)
        requests = []
        params = []
        # n requests of one sample each: vLLM's n>1 rejects greedy
        for i, p in enumerate(prompts):
            for j in range(n):
                requests.append({"prompt_token_ids": list(p)})
                # ignore_eos: stop exactly at `stop`
                params.append(SamplingParams(
                    n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                    max_tokens=max_new_tokens, stop_token_ids=stop, ignore_eos=True,
                    seed=hash32(key ^ hash32(place[i * n + j])),
                    logprobs=0 if logprobs else None, detokenize=False,
                    logit_bias=self.padding_bias))
        # enqueue returns the engine's ids, '<the request's own id>-<8 random hex>'; outputs carry
        # the own id
        engine_ids = self.llm.enqueue(requests, params, use_tqdm=False)
        order = {rid.rsplit("-", 1)[0]: k for k, rid in enumerate(engine_ids)}
        samples = [None] * len(requests)
        while self.llm.llm_engine.has_unfinished_requests():
            for o in self.llm.llm_engine.step():
                if not o.finished:
                    continue
                c = o.outputs[0]
                k = order[o.request_id]
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request finished with {c.finish_reason!r}")
                lps = None
                if logprobs:
                    lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
                samples[k] = Sample(list(c.token_ids), c.finish_reason, lps)
                if on_sample:
                    on_sample(k // n, k % n, samples[k])
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        """Load the student's new weights and reset the prefix cache (its KV came from the old
        weights). Returns the number of tensors the engine loaded.

        named_tensors: (HF name, tensor) pairs, e.g. fsdp_named_tensors(model, dtype=self.dtype),
        consumed one at a time. To an engine in this process each tensor is handed over as it
        comes; to one in a child process they go in serialised buckets of about bucket_mb.
        Asleep, the engine wakes in this order: its weights (loading into offloaded weights would
        be undone by the wake-up: the silent no-update of TRL #5312), the sync, the prefix-cache
        reset, then the KV cache, mapped only once the sync's transient memory is gone.
        """
        rpc = self.llm.collective_rpc
        limit = 0 if self.in_process else self.bucket_bytes
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        rpc("oprd_begin_update")
        bucket = []
        size = 0
        loaded = 0
        for name, t in named_tensors:
            bucket.append((name, t.detach()))
            size += t.numel() * t.element_size()
            if size >= limit:
                loaded += self._send(bucket)
                bucket = []
                size = 0
        if bucket:
            loaded += self._send(bucket)
        rpc("oprd_finish_update")
        # scheduler state only, so the KV cache need not be mapped; it fails while requests run
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after a weight update (requests still "
                               "running?): later rollouts would reuse KV of the old weights")
        # the KV cache (and whatever else is still asleep)
        self.wake()
        return loaded

    def _send(self, bucket):
        # same process: the worker reads our tensors directly
        if self.in_process:
            payload = bucket
        # engine core in a child process: one serialised bucket, in the engine's dtype
        else:
            from safetensors.torch import save
            payload = save({n: t.to(device="cpu", dtype=self.dtype).contiguous()
                            for n, t in bucket})
        return self.llm.collective_rpc("oprd_load_weights", args=(payload,))[0]

    def sleep(self):
        """Offload the weights and free the KV cache (GPU with enable_sleep_mode; a no-op
        otherwise)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self):
        if self.asleep:
            # wakes whatever is still asleep
            self.llm.wake_up()
            self.asleep = False

    def close(self):
        # a core in a child process gets the time to exit on its own (vLLM's 5 s default ran out
        # under torchrun on a CPU, and it killed the core)
        self.llm.llm_engine.engine_core.shutdown(timeout=30)
