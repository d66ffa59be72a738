"""Shared fixtures: tiny random Qwen2/Qwen3 checkpoints and a tiny Qwen-style
tokenizer, built offline."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# one thread per process: on a loaded machine several OpenMP threads per tiny op
# spin against each other (20x slower)
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)

# the files that take longest (each starts several processes, most of them vLLM engines), slowest
# first, from pytest --durations=0 on 2 cores: collected first, so that pytest-xdist hands them out
# first and its two workers (pytest.ini) end together
SLOWEST_FILES = ("test_rollout_vllm.py", "test_sampler_ranks.py", "test_run_guards.py",
                 "test_sampler_ranks_vllm.py", "test_scale.py")


def pytest_collection_modifyitems(items):
    def place(item):
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
    # a stable sort: each file's tests keep their order
    items.sort(key=place)

# Qwen2's pre-tokenizer split; transformers installs it when loading a qwen2/qwen3 folder,
# so ours must match
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")
CORPUS = ("What is 12 + 30? Let us add the numbers step by step. The answer is \\boxed{42}.\n"
          "Please reason step by step, and put your final answer within \\boxed{}.\n"
          "0123456789 + - * / = ( ) { } [ ] "
          "the a of to and is in that it for on with as was at by\n") * 20


def build_tokenizer(out_dir, vocab_size=384):
    """A byte-level BPE trained on a small corpus, saved as an HF tokenizer with a
    Qwen-like chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return len(tok.get_vocab())


def make_checkpoint(out_dir, model_type="qwen3", tied=False, seed=0, tokenizer=True,
                    dtype=torch.float32, **kw):
    """Save a tiny random Qwen2ForCausalLM / Qwen3ForCausalLM with transformers;
    return the folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    vocab = build_tokenizer(out_dir) if tokenizer else 384
    args = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                max_position_embeddings=512, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                eos_token_id=vocab - 3, pad_token_id=vocab - 5, bos_token_id=None)
    args.update(kw)
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[model_type]
    if model_type == "qwen2":
        args.pop("head_dim")
        args["hidden_size"] = args["num_attention_heads"] * (kw.get("head_dim") or 32)
    torch.manual_seed(seed)
    return save_perturbed(model_cls(cfg_cls(**args)).to(dtype), out_dir)


def save_perturbed(m, out_dir):
    """Save a freshly initialised transformers model whose norms (at 1) and biases (at 0) are
    perturbed first, so that every parameter matters to a parity test; return the folder."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_b(tmp_path_factory):
    """Same shape as tiny_qwen3, other weights (for weight-update tests)."""
    return make_checkpoint(tmp_path_factory.mktemp("qwen3b"), "qwen3", seed=1)


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """distill.py's tiny teacher and student: the same architecture and tokenizer, other weights."""
    root = tmp_path_factory.mktemp("pair")
    teacher = make_checkpoint(root / "teacher", "qwen3", seed=3)
    student = make_checkpoint(root / "student", "qwen3", seed=4)
    return teacher, student


@pytest.fixture(scope="session")
def wide_pair(tmp_path_factory):
    """A pair of different widths and depths:
    teacher 4 layers d=128, student 3 layers d=64 (projector, bridge)."""
    root = tmp_path_factory.mktemp("wide_pair")
    teacher = make_checkpoint(root / "teacher", "qwen3", hidden_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                              seed=3)
    return teacher, make_checkpoint(root / "student", "qwen3", seed=4)


@pytest.fixture
def settings_restored(monkeypatch):
    """For a test that runs distill.main() or eval.main() in this process: configure() rewrites the
    script's module globals, so every main() here starts from the defaults, as a new process would,
    and the globals are put back as they were when the test ends. Yields the distill module."""
    import distill
    import eval as ev
    import startup
    from configurator import settings
    saved = {m: settings(vars(m)) for m in (distill, ev)}

    def reset(module):
        for k in set(settings(vars(module))) - set(saved[module]):
            delattr(module, k)
        vars(module).update(saved[module])

    for module in (distill, ev):
        def fresh_main(module=module, real=module.main):
            reset(module)
            return real()
        monkeypatch.setattr(module, "main", fresh_main)
    yield distill
    for module in (distill, ev):
        reset(module)
    startup.started_samplers.clear()
