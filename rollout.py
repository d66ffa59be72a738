"""
The on-policy sampler: prompts in, sampled responses out. distill.py (student rollouts) and eval.py both generate
through this file, with one interface and two backends:

- vLLM, the default wherever it imports and runs on the device asked for. One engine per training process (under
  torchrun one per rank, rollouts data-parallel across ranks; tensor parallelism settable), the share of
  accelerator memory settable, asleep (weights offloaded, KV cache freed) while the trainer updates.
  `update_weights` streams the student's new weights into the engine in place, parameter by parameter, through
  vLLM internals that move between releases (requirements-gpu.txt pins one): a starting engine checks them and
  runs one weight sync, so a mismatch fails in the first minute, not after the first long rollout.
- torch: sampler.py's TorchSampler, batched sampling with model.py's KV cache, the same sampling semantics
  (stated at the top of sampler.py) and outputs. Used where vLLM is absent or built for another device.

    tok = load_tokenizer("path/to/hf_dir")              # tokenizer.py; or "byte": the built-in byte-level one
    sampler = make_sampler("auto", "path/to/hf_dir", gpu_memory_utilization=0.3)
    out = sampler.generate([tok.chat("What is 12 + 30?")], n=4, temperature=1.0, max_new_tokens=256,
                           stop_ids=tok.eos_ids, seed=step, logprobs=True)
    out[0][3].tokens, out[0][3].finish, out[0][3].logprobs    # prompt 0, sample 3
    # on_sample=f: f(i, j, sample) as each finishes (distill.py starts a rollout's alignment to the teacher there)
    sampler.sleep(); ...train step...; sampler.update_weights(fsdp_named_tensors(model)); sampler.wake()

$ python rollout.py path/to/hf_dir "What is 12 + 30?"          # a quick look, default backend
$ python rollout.py path/to/hf_dir "What is 12 + 30?" torch    # the torch backend (-h: usage)

dtypes: checkpoints are saved in fp32. On a GPU both backends sample in bf16 unless given a dtype (vLLM's own
'auto' would pick fp16 or bf16 depending on its version); on a CPU in the checkpoint's dtype.
"""

import contextlib
import importlib
import logging
import os
import sys
from typing import Iterable, Iterator

import torch

from model import check_checkpoint, resolve_checkpoint
from sampler import (Sample, TorchSampler, check_generate_args, checkpoint_stop_ids, dist_info, hash32, mix_seed,
                     sample_places)
from tokenizer import load_tokenizer, read_json

# vLLM logs every prefix-cache reset at INFO: a training log wants its warnings only, and not two that do not apply
# (RoPE has no checkpoint weights, reported at every reload; its chat-template warm-up, a template we never use)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
for _logger, _message in (("vllm.model_executor.model_loader.reload.layerwise", "RotaryEmbedding: Failed to load"),
                          ("vllm.renderers.base", "Chat template warmup")):
    logging.getLogger(_logger).addFilter(lambda record, m=_message: m not in record.getMessage())

VLLM_ONLY = ("tensor_parallel_size", "enable_sleep_mode", "seed", "max_model_len", "enforce_eager", "max_num_seqs",
             "bucket_mb")
TORCH_ONLY = ("sync_every", "decode")
BACKENDS = ("auto", "vllm", "torch")


def make_sampler(backend="auto", model_path=None, model=None, **engine_kw):
    """backend 'auto' (vLLM if it imports and runs on engine_kw's device, else torch) | 'vllm' | 'torch'.

    vllm: the engine loads model_path (model= is not used); engine_kw are vLLM's LLM(...) arguments:
    gpu_memory_utilization, tensor_parallel_size, enable_sleep_mode, seed, max_model_len, dtype, enforce_eager,
    ...; device (default: the one vLLM's build runs on); bucket_mb sets the weight-sync bucket. The torch-only
    sync_every and decode are ignored.
    torch: model= an in-memory Transformer to sample from (shared, not copied: update_weights is then a copy
    onto itself, i.e. nothing), else one is loaded from model_path; dtype, device, gpu_memory_utilization,
    sync_every, decode; the vLLM-only options are ignored, so one config serves both backends.
    A model_path is checked (check_checkpoint) before any engine starts; backend is checked where it is read
    (distill.py's and eval.py's settings, the CLI below).
    """
    if model_path is not None and (backend != "torch" or model is None):
        model_path = check_checkpoint(model_path)[0]
    if backend == "auto":
        runs_on, wanted = vllm_device_type(), engine_kw.get("device")
        backend = "vllm" if runs_on and (wanted is None or torch.device(wanted).type == runs_on) else "torch"
    if backend == "vllm":
        if model_path is None:
            raise ValueError("the vLLM backend loads the model itself: give model_path (an HF checkpoint folder)")
        return VLLMSampler(model_path, **{k: v for k, v in engine_kw.items() if k not in TORCH_ONLY})
    return TorchSampler(model_path, model=model, **{k: v for k, v in engine_kw.items() if k not in VLLM_ONLY})


def vllm_device_type():
    """The device type vLLM's installed build runs on ('cuda', 'cpu', ...); None if vLLM does not import."""
    try:
        from vllm.platforms import current_platform
        return current_platform.device_type or None
    except Exception:  # not installed, or a build for another device
        return None


def vllm_available():
    return vllm_device_type() is not None


def fsdp_named_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a model's parameters as (HF name, full tensor), one at a time, for update_weights.

    For an FSDP2-sharded model each DTensor is all-gathered on its own (full_tensor(), a collective: every rank
    must iterate), so no rank ever holds a second full copy of the model. Plain tensors, and the shards of a
    one-rank mesh, pass through as they are (views of the live weights: copy what must outlive the next step). A
    tied lm_head is skipped (checkpoints store only the embedding). Wrapper prefixes (torch.compile's _orig_mod.,
    activation checkpointing's, DDP's module.) are removed.
    """
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, p in model.named_parameters():
        name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "").removeprefix("module.")
        if tied and name == "lm_head.weight":
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):  # a DTensor; on a one-rank mesh its local shard is the whole tensor
            t = t.to_local() if t.device_mesh.size() == 1 else t.full_tensor()
        yield name, t


def checkpoint_tensors(path) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint folder's (name, tensor) pairs, read one at a time: the start-up sync's weights."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(read_json(index)["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ----------------------------------------------------------------------------- the vLLM backend

VLLM_WRITTEN_FOR = "0.32.0"  # the release the weight sync was written and tested against (requirements-gpu.txt)
VLLM_INTERNALS = {  # module -> what this file uses from it, checked before an engine starts
    "vllm": ("LLM.collective_rpc", "LLM.sleep", "LLM.wake_up", "LLM.reset_prefix_cache", "LLM.enqueue",
             "SamplingParams"),
    "vllm.config": ("set_current_vllm_config",),
    "vllm.model_executor.model_loader.reload.layerwise": ("initialize_layerwise_reload", "finalize_layerwise_reload"),
    "vllm.v1.engine.core_client": ("InprocClient",),
}
ENGINE_INTERNALS = ("llm_engine.engine_core.shutdown", "llm_engine.vllm_config.model_config.dtype",  # a started LLM
                    "llm_engine.step", "llm_engine.has_unfinished_requests")
WORKER_INTERNALS = ("vllm_config", "model_runner.get_model", "model_runner.model_config")  # each engine worker


class VLLMVersionError(RuntimeError):
    """The installed vLLM lacks an internal the weight sync uses, or the start-up sync failed: one line."""

    def __init__(self, problem):
        import vllm
        super().__init__(f"vLLM {vllm.__version__}: {' '.join(str(problem).split())[:500]}; rollout.py's in-place "
                         f"weight sync was written against vLLM {VLLM_WRITTEN_FOR} (requirements-gpu.txt)")


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
    """Methods that vLLM mixes into its worker class (worker_extension_cls) and that run inside every engine
    worker, called through llm.collective_rpc. One weight update = begin, one load per bucket, finish.

    They drive vLLM's in-place layerwise reload (vllm/model_executor/model_loader/reload): begin puts each
    layer's parameters back into checkpoint format, load_weights takes HF-named tensors (fusing q/k/v and
    gate/up, sharding for tensor parallelism), and a layer is post-processed (the CPU build repacks linear
    weights for oneDNN) and copied into the kernel tensors as soon as all its weights have arrived, so the
    engine's memory and CUDA-graph pointers stay where they were. Plain model.load_weights would write
    checkpoint-format tensors into repacked ones.
    """

    def oprd_missing_internals(self):
        return missing_attrs(self, WORKER_INTERNALS)

    def oprd_begin_update(self):
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def oprd_load_weights(self, payload):
        """payload: safetensors bytes (engine in another process) or a list of (name, tensor) (same process)."""
        from safetensors.torch import load
        from vllm.config import set_current_vllm_config
        weights = list(load(payload).items()) if isinstance(payload, bytes) else payload
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            model.load_weights(weights)
            # a tied LM head is its own layer in vLLM and load_weights skips it: hand it the new embedding
            # too, or the reload would put its old (stale) kernel tensor back
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


def engine_args(model_path, hf_config, device_type, world=1, gpu_memory_utilization=None, tensor_parallel_size=1,
                enable_sleep_mode=None, seed=0, max_model_len=None, dtype=None, **kw):
    """vLLM's LLM(...) arguments for a checkpoint (its folder and config.json) on a device type, 'cuda' or
    'cpu', with world ranks; kw passes through. Starts nothing, so tests check them on any machine."""
    on_gpu = device_type == "cuda"
    if dtype in (None, "auto"):  # never vLLM's 'auto': fp16 or bf16 by vLLM version for an fp32 checkpoint
        # on CPU the checkpoint's dtype: vLLM's CPU build would downcast an fp32 checkpoint to bf16
        dtype = "bfloat16" if on_gpu else hf_config.get("dtype") or hf_config.get("torch_dtype") or "auto"
    limit = hf_config.get("max_position_embeddings")
    if max_model_len and limit and max_model_len > limit:  # vLLM refuses a context beyond the model's
        max_model_len = limit
    if gpu_memory_utilization is None:  # colocated with the trainer: leave it most of the memory. On CPU (a share
        # of RAM; VLLM_CPU_KVCACHE_SPACE wins) vLLM's 0.92 of the NUMA node refuses to start once others hold a little
        gpu_memory_utilization = 0.3 if on_gpu else 0.5
    args = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=on_gpu if enable_sleep_mode is None else enable_sleep_mode,
                skip_tokenizer_init=True,  # ids in, ids out: no tokenizer needed (the byte task has none)
                logprobs_mode="raw_logprobs", enable_prefix_caching=True,
                worker_extension_cls=f"{'rollout' if __name__ == '__main__' else __name__}.WeightSyncExtension")
    if world > 1:
        args["distributed_executor_backend"] = "external_launcher"
    return {**args, **kw}


class VLLMSampler:
    """A vLLM engine in this process's reach (see the top of the file for what it does).

    Alone, the engine core runs in a child process (vLLM's default) and weights travel as safetensors bytes; on
    the CPU it runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=1 keeps vLLM's default there).
    Under torchrun (WORLD_SIZE > 1) each rank builds its own engine with distributed_executor_backend=
    "external_launcher": the engine lives in the rank's own process, on the rank's device (LOCAL_RANK), reuses
    the torch.distributed group (tensor parallelism spans consecutive ranks), and weights are handed over as
    tensors with no copy. Call close() before dist.destroy_process_group(): vLLM's teardown then destroys the
    default group itself, so guard that call with dist.is_initialized().
    """

    def __init__(self, model_path, device=None, bucket_mb=256, **engine_kw):
        from vllm import LLM
        runs_on = vllm_device_type()
        device = torch.device(device or runs_on or "cpu")
        if device.type != runs_on:  # e.g. the CPU tests on a GPU node: no CUDA engine for them
            raise ValueError(f"the vLLM sampler was asked for device {device}, but this vLLM build runs on "
                             f"{runs_on}: use the torch backend there")
        missing = missing_vllm_internals()
        if missing:
            raise VLLMVersionError(f"no {', '.join(missing)}")
        model_path = resolve_checkpoint(model_path)  # a hub id: downloaded once, here
        rank, world = dist_info()
        tp = engine_kw.get("tensor_parallel_size", 1)
        if world % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the {world} ranks")
        self.dp_rank, self.dp_size = rank // tp, world // tp
        args = engine_args(model_path, read_json(os.path.join(model_path, "config.json")), device.type, world,
                           **engine_kw)
        self.sleep_mode = args["enable_sleep_mode"]
        if device.type == "cpu" and world == 1:  # the CPU build would spawn an engine core, which spawns its worker,
            # each importing torch and vLLM again: 24 s to start a tiny model here, against 6 s in this process
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = LLM(**args)
        self.stop_ids = checkpoint_stop_ids(model_path)
        self.bucket_bytes, self.asleep = int(bucket_mb * 2**20), False
        self.synced_at_start = self.check_weight_sync(model_path)

    def check_weight_sync(self, model_path):
        """Fail now, in one line, if the weight sync cannot work with this vLLM: the internals it uses in the engine
        and its workers, then one sync of the engine's own weights (read again). Returns the tensors loaded."""
        from vllm.v1.engine.core_client import InprocClient
        try:
            missing = missing_attrs(self.llm, ENGINE_INTERNALS)
            missing += sorted({m for worker in self.llm.collective_rpc("oprd_missing_internals") for m in worker})
            if missing:
                raise AttributeError(f"no {', '.join(missing)}")
            self.in_process = isinstance(self.llm.llm_engine.engine_core, InprocClient)
            self.dtype = self.llm.llm_engine.vllm_config.model_config.dtype
            return self.update_weights(checkpoint_tensors(model_path))
        except Exception as e:
            with contextlib.suppress(Exception):  # a failed check: free the engine, report the check's error
                self.close()
            problem = str(e) if isinstance(e, AttributeError) else f"the start-up weight sync failed: {e}"
            raise VLLMVersionError(problem) from e

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=256, stop_ids=None,
                 seed=0, logprobs=False, places=None, on_sample=None):
        """As TorchSampler.generate; on_sample(i, j, sample) is called as each request finishes, while the engine
        goes on with the others (LLM.generate's own loop over engine steps, with a hand-over)."""
        from vllm import SamplingParams
        check_generate_args(prompts, n, temperature, top_p, max_new_tokens)
        self.wake()
        stop = list(self.stop_ids if stop_ids is None else stop_ids)
        key, place = mix_seed(seed, self.dp_rank if places is None else 0), sample_places(len(prompts), n, places)
        requests, params = [], []
        for i, p in enumerate(prompts):  # n requests of one sample each: vLLM's n>1 rejects greedy
            for j in range(n):
                requests.append({"prompt_token_ids": list(p)})
                params.append(SamplingParams(
                    n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                    max_tokens=max_new_tokens, stop_token_ids=stop, ignore_eos=True,  # stop exactly at `stop`
                    seed=hash32(key ^ hash32(place[i * n + j])), logprobs=0 if logprobs else None, detokenize=False))
        # enqueue returns the engine's ids, '<the request's own id>-<8 random hex>'; outputs carry the own id
        order = {rid.rsplit("-", 1)[0]: k for k, rid in enumerate(self.llm.enqueue(requests, params, use_tqdm=False))}
        samples = [None] * len(requests)
        while self.llm.llm_engine.has_unfinished_requests():
            for o in self.llm.llm_engine.step():
                if not o.finished:
                    continue
                c, k = o.outputs[0], order[o.request_id]
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request finished with {c.finish_reason!r}")
                lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)] if logprobs else None
                samples[k] = Sample(list(c.token_ids), c.finish_reason, lps)
                if on_sample:
                    on_sample(k // n, k % n, samples[k])
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        """Load the student's new weights, then reset the prefix cache (its KV came from the old weights).
        Returns the number of tensors the engine loaded.

        named_tensors: (HF name, tensor) pairs, e.g. fsdp_named_tensors(model), consumed one at a time. To an
        engine in this process each tensor is handed over as it comes; to one in a child process they go in
        serialised buckets of about bucket_mb. Asleep, the weights are woken first: loading into offloaded
        weights would be undone by the wake-up (the silent no-update of TRL #5312).
        """
        rpc = self.llm.collective_rpc
        limit = 0 if self.in_process else self.bucket_bytes
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        rpc("oprd_begin_update")
        bucket, size, loaded = [], 0, 0
        for name, t in named_tensors:
            bucket.append((name, t.detach()))
            size += t.numel() * t.element_size()
            if size >= limit:
                loaded += self._send(bucket)
                bucket, size = [], 0
        if bucket:
            loaded += self._send(bucket)
        rpc("oprd_finish_update")
        self.wake()
        self.llm.reset_prefix_cache()
        return loaded

    def _send(self, bucket):
        if self.in_process:  # same process: the worker reads our tensors directly
            payload = bucket
        else:  # engine core in a child process: one serialised bucket, in the engine's dtype
            from safetensors.torch import save
            payload = save({n: t.to(device="cpu", dtype=self.dtype).contiguous() for n, t in bucket})
        return self.llm.collective_rpc("oprd_load_weights", args=(payload,))[0]

    def sleep(self):
        """Offload the weights and free the KV cache (GPU with enable_sleep_mode; a no-op otherwise)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self):
        if self.asleep:
            self.llm.wake_up()  # wakes whatever is still asleep
            self.asleep = False

    def close(self):
        self.llm.llm_engine.engine_core.shutdown()


# ----------------------------------------------------------------------------- a quick look

USAGE = """usage: python rollout.py <hf_checkpoint_dir> <prompt> [auto|vllm|torch]

Samples one answer to <prompt> (rendered with the checkpoint's chat template; temperature 0.7, top-p 0.95,
up to 512 new tokens) with the given backend (default auto: vLLM if it imports, else torch)."""


def main(argv):
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if len(argv) not in (2, 3):
        print(USAGE.splitlines()[0], file=sys.stderr)
        sys.exit(2)
    path, prompt, backend = argv[0], argv[1], argv[2] if len(argv) > 2 else "auto"
    try:  # a bad path, checkpoint, backend or vLLM: one line, no traceback
        if backend not in BACKENDS:
            raise ValueError(f"unknown sampler backend {backend!r}: expected 'auto', 'vllm' or 'torch'")
        path = check_checkpoint(path)[0]
        tok = load_tokenizer(path)
        ids = tok.chat(prompt)
        sampler = make_sampler(backend, path)
    except (ValueError, OSError, VLLMVersionError) as e:  # CheckpointError is a ValueError; no chat template: OSError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    s = sampler.generate([ids], temperature=0.7, top_p=0.95, max_new_tokens=512, stop_ids=tok.eos_ids)[0][0]
    print(f"[{type(sampler).__name__}, {len(s.tokens)} tokens, finish={s.finish}]\n{tok.decode(s.tokens)}")
    sampler.close()


if __name__ == "__main__":
    main(sys.argv[1:])
