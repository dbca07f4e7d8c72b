"""The offline demo's assets: a small Qwen3 teacher trained on the Python standard library.

Every machine with Python has a real corpus to hand: the standard library's own source
(``sysconfig.get_paths()["stdlib"]``). ``prepare_demo`` turns it into

* a byte-level BPE tokenizer trained with the ``tokenizers`` library (Qwen2's pre-tokenizer:
  NFC, a ``Split`` on Qwen2's regex, then ``ByteLevel``), with eos/pad tokens and a ChatML template;
* packed ``input_ids``/``labels`` blocks for training and, from a few held-out modules that
  neither the tokenizer nor the teacher ever sees, for evaluation;
* a real ``Qwen3ForCausalLM`` teacher pretrained on the training blocks, saved with its tokenizer
  so ``from_pretrained`` loads it, and its held-out perplexity.

The settings are the recipe's ``demo:`` section (``edgerazor.recipe.DemoSection``; the built-in
``configs/demo.yaml`` spells out the defaults), so ``--set demo.teacher.num_layers=2`` reaches them.
Everything is cached under ``<cache>/<hash of the settings and the corpus>``; the directory is
built under a temporary name and renamed into place, so an interrupted build leaves nothing that
a later run could mistake for a finished one, and a second run skips teacher training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from edgerazor.recipe import DemoPretrain, DemoSection, DemoTeacher

#: Bump when the cache layout or the way assets are built changes: old caches are then ignored.
CACHE_FORMAT = 1

EOS, PAD = "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS, PAD, IM_START, IM_END)

#: Qwen2's pre-tokenizer pattern (also Qwen3's), so llama.cpp's converter can treat the vocabulary
#: like a Qwen2 one.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: ChatML, as Qwen uses: every turn is ``<|im_start|>role\ncontent<|im_end|>\n``.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Parts of the stdlib directory that are not the standard library's Python source, or not code a
#: language model should learn from (test suites, codec tables, the pydoc topic dump,
#: machine-specific sysconfig data).
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "lib-dynload", "__pycache__",
    "encodings", "pydoc_data",
})
EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")


def key_settings(settings: DemoSection) -> dict[str, Any]:
    """The settings as the flat mapping the cache key has hashed since cache format 1 (pretraining
    fields prefixed ``teacher_``), so a cache built before the settings moved into the recipe stays valid."""
    pretrain = {("lr" if k == "learning_rate" else k): v for k, v in settings.pretrain.model_dump(mode="json").items()}
    return {
        **settings.teacher.model_dump(mode="json"),
        **settings.corpus.model_dump(mode="json"),
        **{f"teacher_{k}": v for k, v in pretrain.items()},
        "seed": settings.seed,
    }


@dataclass
class DemoAssets:
    teacher_dir: Path  # model + tokenizer; ``from_pretrained`` loads both
    train_dataset: Any  # datasets.Dataset of packed blocks: input_ids, labels
    eval_dataset: Any  # held-out blocks, same columns
    teacher_ppl: float  # held-out perplexity of the teacher, measured when it was built
    settings: DemoSection
    cache_dir: Path  # <cache root>/<key>
    from_cache: bool  # True when nothing was built in this call
    teacher_train_seconds: float  # wall time of teacher pretraining (when it was built)
    build_seconds: float  # wall time of the whole build (when it was built)
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return self.cache_dir.name


# --------------------------------------------------------------------------------------------
# corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(relative: Path) -> str:
    """The top-level stdlib module a file belongs to: ``json/decoder.py`` -> ``json``."""
    first = relative.parts[0]
    return first[:-3] if first.endswith(".py") else first


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, relative to ``root``, sorted (tests and data excluded)."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(EXCLUDED_PREFIXES) and not d.startswith(".")
        )
        for name in filenames:
            if name.endswith(".py") and not name.startswith(EXCLUDED_PREFIXES):
                found.append((Path(dirpath) / name).relative_to(root))
    return sorted(found)


@dataclass
class Corpus:
    train: list[Path]  # relative paths, in training order
    held_out: list[Path]
    root: Path

    def read(self, relative: Path) -> str:
        return (self.root / relative).read_text(encoding="utf-8", errors="replace")

    def fingerprint(self) -> str:
        """A hash of which files there are and how big: another Python's stdlib is another corpus."""
        h = hashlib.sha256()
        for rel in sorted(self.train + self.held_out):
            h.update(f"{rel.as_posix()}\0{(self.root / rel).stat().st_size}\n".encode())
        return h.hexdigest()


def split_corpus(settings: DemoSection, root: Path | None = None) -> Corpus:
    """Held-out modules (whole packages included) for evaluation, the rest shuffled for training."""
    root = root or stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"no Python source found under the standard library directory {root}")
    held = set(settings.corpus.held_out)
    present = {module_name(f) for f in files}
    missing = sorted(held - present)
    if missing:
        raise ValueError(f"held-out modules not found in {root}: {', '.join(missing)}")
    held_out = [f for f in files if module_name(f) in held]
    train = [f for f in files if module_name(f) not in held]
    random.Random(settings.seed).shuffle(train)
    return Corpus(train, held_out, root)


# --------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A Qwen2-style byte-level BPE trained on ``texts``, wrapped as ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def pack_blocks(documents: list[list[int]], eos_id: int, seq_len: int) -> list[list[int]]:
    """Concatenate documents, each followed by ``eos_id``, and cut into full ``seq_len`` blocks."""
    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
        stream.append(eos_id)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def blocks_dataset(blocks: list[list[int]]):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Data collator for equal-length packed blocks (the demo's datasets)."""
    return {key: torch.tensor([list(r[key]) for r in rows], dtype=torch.long) for key in ("input_ids", "labels")}


# --------------------------------------------------------------------------------------------
# teacher


def use_all_cores() -> int:
    """Give torch every core this process may run on (the demo targets 2); returns the count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


def teacher_config(shape: DemoTeacher, tokenizer, vocab_size: int):
    """A tied-embedding ``Qwen3Config`` of ``shape`` (the recipe's ``demo.teacher``)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen3ForCausalLM"],
    )


def _lr_factor(step: int, pretrain: DemoPretrain) -> float:
    warmup = max(pretrain.warmup_steps, 0)
    if step < warmup:
        return (step + 1) / warmup
    span = max(pretrain.steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    floor = pretrain.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def pretraining_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95) with weight decay on matrices only, not on norms and biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )


def pretraining_step(model, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One causal-LM step on a batch of packed blocks (gradients clipped at 1.0); returns the loss."""
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_teacher(model, blocks: torch.Tensor, settings: DemoSection, progress: bool = True) -> list[float]:
    """Pretrain ``model`` on ``blocks`` ([N, seq_len] long) as ``settings.pretrain`` says; returns the loss per step."""
    from tqdm.auto import tqdm

    pretrain = settings.pretrain
    optimizer = pretraining_optimizer(model, pretrain.learning_rate, pretrain.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, pretrain))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(blocks), generator=generator)
    cursor = 0
    losses: list[float] = []
    model.train()
    bar = tqdm(range(pretrain.steps), desc="teacher pretraining", unit="step", disable=not progress)
    for _ in bar:
        if cursor + pretrain.batch_size > len(order):  # next epoch
            order, cursor = torch.randperm(len(blocks), generator=generator), 0
        batch = blocks[order[cursor : cursor + pretrain.batch_size]]
        cursor += pretrain.batch_size
        losses.append(pretraining_step(model, optimizer, batch))
        scheduler.step()
        recent = losses[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------
# cache


def default_cache_root(name: str = "demo") -> Path:
    """``$EDGERAZOR_CACHE/<name>``, else ``$XDG_CACHE_HOME/edgerazor/<name>``, else ``~/.cache/edgerazor/<name>``."""
    if os.environ.get("EDGERAZOR_CACHE"):
        return Path(os.environ["EDGERAZOR_CACHE"]).expanduser() / name
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "edgerazor" / name


def cache_key(settings: DemoSection, corpus: Corpus) -> str:
    import tokenizers
    import transformers

    payload = {
        "format": CACHE_FORMAT,
        "settings": key_settings(settings),
        "corpus": corpus.fingerprint(),
        "python": sys.version_info[:2],
        "versions": {"transformers": transformers.__version__.split(".")[0], "tokenizers": tokenizers.__version__},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[edgerazor demo] {message}", file=sys.stderr, flush=True)


def _load_assets(final: Path, settings: DemoSection, from_cache: bool) -> DemoAssets:
    import datasets

    meta = json.loads((final / "meta.json").read_text())
    return DemoAssets(
        teacher_dir=final / "teacher",
        train_dataset=datasets.load_from_disk(str(final / "train")),
        eval_dataset=datasets.load_from_disk(str(final / "eval")),
        teacher_ppl=float(meta["teacher_ppl"]),
        settings=settings,
        cache_dir=final,
        from_cache=from_cache,
        teacher_train_seconds=float(meta["teacher_train_seconds"]),
        build_seconds=float(meta["build_seconds"]),
        meta=meta,
    )


def _build(out: Path, settings: DemoSection, corpus: Corpus, progress: bool) -> None:
    """Write teacher/, train/, eval/ and meta.json (last) into ``out``."""
    from transformers import Qwen3ForCausalLM

    from edgerazor.eval.perplexity import perplexity

    start = time.perf_counter()
    shape, data = settings.teacher, settings.corpus
    train_texts: list[str] = []
    chars = 0
    for rel in corpus.train:
        if data.train_chars is not None and chars >= data.train_chars:
            break
        text = corpus.read(rel)
        if data.train_chars is not None:
            text = text[: data.train_chars - chars]
        train_texts.append(text)
        chars += len(text)
    used_train = corpus.train[: len(train_texts)]
    eval_texts = [corpus.read(rel) for rel in corpus.held_out]
    _log(progress, f"corpus: {len(train_texts)} training files ({chars / 1e6:.1f}M chars), "
                   f"{len(eval_texts)} held-out files of {', '.join(data.held_out)}")

    t = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, data.vocab_size)  # held-out text never reaches it
    if len(tokenizer) != data.vocab_size:
        _log(progress, f"tokenizer: the corpus supports only {len(tokenizer)} tokens (asked {data.vocab_size})")
    backend = tokenizer.backend_tokenizer
    train_ids = [e.ids for e in backend.encode_batch(train_texts, add_special_tokens=False)]
    eval_ids = [e.ids for e in backend.encode_batch(eval_texts, add_special_tokens=False)]
    train_blocks = pack_blocks(train_ids, tokenizer.eos_token_id, shape.seq_len)
    eval_blocks = pack_blocks(eval_ids, tokenizer.eos_token_id, shape.seq_len)
    if not train_blocks or not eval_blocks:
        raise ValueError(f"the corpus is too small for demo.teacher.seq_len={shape.seq_len}")
    all_eval = len(eval_blocks)
    if data.eval_blocks is not None and data.eval_blocks < len(eval_blocks):
        step = len(eval_blocks) / data.eval_blocks  # evenly spaced: every held-out module is represented
        eval_blocks = [eval_blocks[int(i * step)] for i in range(data.eval_blocks)]
    train_tokens = sum(map(len, train_ids))
    tokenize_seconds = time.perf_counter() - t
    _log(progress, f"tokenizer: {len(tokenizer)} tokens, {chars / max(train_tokens, 1):.2f} chars/token; "
                   f"{len(train_blocks)} training blocks, {len(eval_blocks)}/{all_eval} held-out blocks "
                   f"of {shape.seq_len} tokens ({tokenize_seconds:.0f} s)")

    torch.manual_seed(settings.seed)
    config = teacher_config(shape, tokenizer, data.vocab_size)
    model = Qwen3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    steps = settings.pretrain.steps
    seen = steps * settings.pretrain.batch_size * shape.seq_len
    _log(progress, f"teacher: Qwen3 {shape.num_layers} layers, hidden {shape.hidden_size}, "
                   f"{n_params / 1e6:.1f}M parameters; {steps} steps "
                   f"({seen / 1e6:.2f}M tokens, {seen / (len(train_blocks) * shape.seq_len):.2f} epochs)")
    t = time.perf_counter()
    losses = train_teacher(model, torch.tensor(train_blocks, dtype=torch.long), settings, progress)
    teacher_train_seconds = time.perf_counter() - t

    eval_dataset = blocks_dataset(eval_blocks)
    teacher_ppl = perplexity(model, eval_dataset, progress=progress)
    _log(progress, f"teacher: held-out perplexity {teacher_ppl:.2f} after {teacher_train_seconds:.0f} s")

    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = shape.seq_len
    model.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    blocks_dataset(train_blocks).save_to_disk(str(out / "train"))
    eval_dataset.save_to_disk(str(out / "eval"))
    meta = {
        "format": CACHE_FORMAT,
        "settings": settings.model_dump(mode="json"),
        "teacher_ppl": teacher_ppl,
        "teacher_train_seconds": teacher_train_seconds,
        "tokenize_seconds": tokenize_seconds,
        "build_seconds": time.perf_counter() - start,
        "teacher_parameters": n_params,
        "teacher_final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1),
        "train_files": [p.as_posix() for p in used_train],
        "held_out_files": [p.as_posix() for p in corpus.held_out],
        "train_tokens": train_tokens,
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "stdlib": str(corpus.root),
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "built_at": time.time(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: the build is complete


def prepare_demo(
    cache_dir: str | Path | None = None,
    settings: DemoSection = DemoSection(),
    progress: bool = True,
) -> DemoAssets:
    """Build (or reuse from the cache) the demo's tokenizer, datasets and pretrained teacher.

    ``cache_dir`` is the cache root (default: ``default_cache_root()``); the assets live in
    ``<cache_dir>/<key>``, where the key hashes ``settings``, the stdlib file list and the
    library versions. A complete cache entry is never rebuilt; a build goes to a temporary
    sibling directory and is renamed into place when complete.
    """
    use_all_cores()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    corpus = split_corpus(settings)
    final = root / cache_key(settings, corpus)
    if (final / "meta.json").is_file():
        _log(progress, f"using the cached teacher in {final}")
        return _load_assets(final, settings, from_cache=True)

    _log(progress, f"building the demo teacher (cached afterwards in {final})")
    build_cache_entry(final, lambda tmp: _build(tmp, settings, corpus, progress))
    return _load_assets(final, settings, from_cache=False)


def build_cache_entry(final: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(tmp)`` in a temporary sibling of ``final`` and rename it into place.

    An entry is complete when its ``meta.json`` exists (``build`` writes it last): an interrupted build
    leaves nothing a later run could mistake for a finished one, and an incomplete entry is replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        if final.exists() and not (final / "meta.json").is_file():
            shutil.rmtree(final)  # an incomplete entry left by something else: replace it
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            # another process finished the same build first: use theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
