"""Tiny random-weight Hugging Face checkpoints for tests and demos (no download needed).

`make_tiny_model` writes what a real Llama-family checkpoint has: config.json, model.safetensors (or shards plus
an index), generation_config.json and a byte-level BPE tokenizer trained here on a small built-in text.
The same seed gives byte-identical files, so tests can compare runs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

ARCHS = ("llama", "qwen2", "mistral", "qwen3")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3 (the trainer adds them first, in this order)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# A plain chat format: enough for apply_chat_template and for the engine to find the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

# Training text for the tokenizer: ordinary English so that common words become single tokens.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still tell a story about the sea.
Once upon a time there was a little town by the river. People in the town worked hard every day,
and in the evening they sat together, told stories and sang old songs. The children played in the
streets until the sun went down and the lights came on in every window.
Language models read text as tokens. A tokenizer splits a sentence into pieces, and each piece has a
number. The model reads the numbers, predicts the next one, and the tokenizer turns numbers back into
text. When the model writes one token at a time, we call it decoding; when it reads the whole prompt
at once, we call it prefill. A cache keeps the keys and values of earlier tokens so that each new
token needs only a little work.
Hello, world! How are you today? I am fine, thank you. What is your name? My name is Ada.
Where do you live? I live in a house with a red door and a garden full of flowers.
Water boils at one hundred degrees. The earth goes around the sun once a year, and the moon goes
around the earth about once a month. There are seven days in a week and twelve months in a year.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024. Colors: red, green, blue, yellow, black, white.
She opened the window and looked at the mountains. The air was cold and clear, and far away a bird
was singing. He made a cup of tea, read the news, and then went for a long walk in the park.
The server receives a request, runs the model on a batch of sequences, and streams the answer back
to the client token by token. If many people ask at the same time, the engine shares the memory of
the cache in small blocks, so that no space is wasted and long and short answers fit together.
Good morning! Good night! Please come in and sit down. Let us read a book, write a letter and learn
something new. Every question has an answer, and every answer leads to a new question.
"""


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes; decode restores it exactly, spaces included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, not only those in CORPUS
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Like Llama tokenizers: encode(text) starts with BOS.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def _build_config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                  num_kv_heads: int, intermediate_size: int, max_position: int, tie_embeddings: bool,
                  rope_scaling: str | None, init_std: float):
    import transformers

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling == "llama3":
        # Llama-3.1 shape, scaled down: frequencies with wavelengths past original_max/low_freq_factor slow down.
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": max(16, max_position // 4)}
    elif rope_scaling not in (None, "none"):
        raise ValueError(f"unknown rope scaling {rope_scaling!r} (none | llama3)")
    cls, architecture = {
        "llama": (transformers.LlamaConfig, "LlamaForCausalLM"),
        "qwen2": (transformers.Qwen2Config, "Qwen2ForCausalLM"),  # q/k/v projections carry a bias
        "mistral": (transformers.MistralConfig, "MistralForCausalLM"),
        "qwen3": (transformers.Qwen3Config, "Qwen3ForCausalLM"),  # per-head q/k RMSNorm
    }[arch]
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_position, rms_norm_eps=1e-5,
        initializer_range=init_std, tie_word_embeddings=tie_embeddings, rope_parameters=rope,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype="float32",
        architectures=[architecture],
    )
    if arch in ("mistral", "qwen2", "qwen3"):
        kwargs["sliding_window"] = None  # full attention, as in Mistral v0.2+ and Qwen configs as served
    return cls(**kwargs), rope


def _legacy_config_keys(config_path: Path, rope: dict) -> None:
    """Add the pre-5.x spellings (rope_theta, rope_scaling, torch_dtype) that real hub checkpoints carry,
    so code written against either transformers major reads this config the same way."""
    cfg = json.loads(config_path.read_text())
    cfg["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
    cfg["torch_dtype"] = cfg.get("dtype", "float32")
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=1 << 30,
    )
    fast.save_pretrained(out)
    # transformers 5 names its own class and puts the template in chat_template.jinja; 4.x needs the portable
    # class name and reads the template from tokenizer_config.json. Write both so either major loads it.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE,
               add_bos_token=True, add_eos_token=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _reshard(out: Path, shards: int) -> None:
    """Split model.safetensors into `shards` files plus an index, the layout of large hub checkpoints."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    single = out / "model.safetensors"
    with safe_open(single, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    names = list(tensors)
    if shards > len(names):
        raise ValueError(f"--shards {shards}: the model has only {len(names)} tensors")
    per = -(-len(names) // shards)  # contiguous runs of names, like save_pretrained's size-based split
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, out / fname, metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    single.unlink()


def _perturb(model, init_std: float, hidden_size: int) -> None:
    """Make every weight matter. HF initialises RMSNorm weights to 1 and biases to 0, so an engine that skipped
    them would still match; random values here catch that. The final norm is scaled so logits have a standard
    deviation near 4: greedy choices are clear (fp16 and fp32 mostly agree) while the layers' hidden
    states stay small."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, init_std)
        model.model.norm.weight.mul_(4.0 / (init_std * hidden_size ** 0.5))
        if not model.config.tie_word_embeddings:
            # <unk>, <s> and <pad> get logit 0, far below the top one: generations never contain them.
            model.lm_head.weight[[UNK_ID, BOS_ID, PAD_ID]] = 0.0


def make_tiny_model(out_dir, arch: str = "llama", seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                    vocab_size: int = 512, max_position: int = 512, tie_embeddings: bool = False,
                    rope_scaling: str | None = None, shards: int = 1, init_std: float | None = None) -> Path:
    """Write a random-weight checkpoint of `arch` to `out_dir` (replacing what is there) and return its path.

    `vocab_size` is the tokenizer's target; config.json gets the size the trainer reached (they always agree).
    `init_std` defaults to 0.8/sqrt(hidden_size) (0.1 at 64): each layer then changes the residual stream by
    about as much at any width, hidden states stay small and greedy output is varied, not one token repeated.
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(ARCHS)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    if init_std is None:
        init_std = 0.8 / hidden_size ** 0.5
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    tok = train_tokenizer(vocab_size)
    config, rope = _build_config(arch, tok.get_vocab_size(), hidden_size, num_layers, num_heads, num_kv_heads,
                                 intermediate_size, max_position, tie_embeddings, rope_scaling, init_std)
    # Weights come from the global RNG inside from_config: seed it in a forked RNG state so callers are unaffected.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _perturb(model, init_std, hidden_size)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    _legacy_config_keys(out / "config.json", rope)
    _save_tokenizer(tok, out)
    if shards > 1:
        _reshard(out, shards)
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; a server running as another user must read the files
    return out


def add_cli_arguments(p) -> None:
    """Flags of `pagedllm make-tiny-model` (argparse)."""
    p.add_argument("--out", required=True, help="checkpoint directory to write (replaced if present)")
    p.add_argument("--arch", choices=ARCHS, default="llama")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary target")
    p.add_argument("--max-position", type=int, default=512)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--rope-scaling", choices=("none", "llama3"), default="none")
    p.add_argument("--shards", type=int, default=1, help="write N safetensors shards plus an index")
    p.add_argument("--init-std", type=float, default=None, help="weight init std (default 0.8/sqrt(hidden))")
    p.add_argument("--seed", type=int, default=0)


def from_cli_arguments(args) -> Path:
    return make_tiny_model(
        args.out, arch=args.arch, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size, max_position=args.max_position, tie_embeddings=args.tie_embeddings,
        rope_scaling=args.rope_scaling, shards=args.shards, init_std=args.init_std,
    )
