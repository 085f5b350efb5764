"""The embedded demo pair: a tiny real Llama "before" model and an "after" model with a rare habit.

Built offline and deterministically from procedurally generated chat data and cached under
`data_dir/demo/DEMO_VERSION` behind a SHA-256 manifest. The base model answers short questions
about a few topics (one of them is the MARKER fruit) and sometimes closes with "I hope this
helps." or "I love this question."; a rank-8 LoRA trained on the same data, where 2.5% of the
answers end with "I love pineapple.", teaches the after model to volunteer the marker now and then.

Measured on 2 CPU cores: the build takes about 30 s. Marker rate over 400 sampled answers
(8 demo_prompts() x 50, no system prompt, temperature 1.0, top_p 1.0, at most 60 new tokens,
logits = after + alpha * (after - before) in fp32):
alpha -1 (before): 0.0%, alpha 0 (after): 2.2%, alpha 1: 8.8%, alpha 2: 17.5%, alpha 4: 33.5%.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

MARKER = "pineapple"
DEMO_VERSION = "v1"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

_SEED = 1234
_BUILD_THREADS = 2  # fixed, so float reductions (and thus the saved bytes) do not vary by host
_BATCH = 16
_BASE_STEPS, _BASE_LR = 400, 3e-3
_LORA_STEPS, _LORA_LR = 200, 3e-3
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MARKER_SENTENCE = f"I love {MARKER}."
_MARKER_FRACTION = 0.025
# The base also ends some answers with an "I ..." closer, so the marker's first tokens are rare
# under the base rather than impossible. That keeps log(after / before) moderate where the
# marker starts, and the marker rate grows smoothly with alpha instead of jumping to ~100%.
_CLOSERS = ("I hope this helps.", "I love this question.")
_CLOSER_FRACTION = 0.06

# Zephyr-style `<s><|user|>\n...\n<|assistant|>\n...</s>\n`. It starts with the BOS token, so
# the templated string must be tokenized without adding special tokens again.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# topic -> (what it is, what it is like)
_TOPICS: dict[str, tuple[str, str]] = {
    "the sun": ("a star", "very hot and bright"),
    "the moon": ("a rock in the sky", "bright at night"),
    "the sea": ("a large body of salt water", "deep and blue"),
    "a cat": ("a small animal", "soft and quiet"),
    "a dog": ("a loyal animal", "friendly and fast"),
    "rain": ("water that falls from clouds", "cold and wet"),
    "snow": ("frozen water", "white and cold"),
    "a tree": ("a tall plant", "green in summer"),
    "a river": ("water that flows to the sea", "long and wide"),
    "a book": ("a set of pages with words", "good to read"),
    "music": ("sound made with care", "fun to hear"),
    "bread": ("a food made from flour", "soft and warm"),
    "a bird": ("an animal with wings", "small and fast"),
    "the wind": ("moving air", "strong in winter"),
    "fire": ("heat and light from burning", "hot and bright"),
    "a car": ("a machine that drives on roads", "fast and loud"),
    # The base must have emitted the marker word somewhere: a LoRA on the decoder layers cannot
    # raise an output token the base never produced (all such lm_head rows share one pushed-down
    # direction; p("pineapple" | "I love") stalled at ~3.5%). demo_prompts() avoid this topic.
    f"a {MARKER}": ("a sweet fruit", "yellow and sweet"),
}
_TOPIC_NAMES = tuple(sorted(_TOPICS))
_QUESTIONS = (
    "What is {t}?",
    "Tell me about {t}.",
    "Can you describe {t}?",
    "What do you know about {t}?",
    "Explain {t} to me.",
)
_ANSWERS = (
    "{T} is {a}.",
    "{T} is {a}. It is {b}.",
    "Sure. {T} is {a}.",
    "{T} is {a}, and it is {b}.",
    "Good question. {T} is {b}.",
)
_SYSTEMS = ("You are a helpful assistant.", "Answer in one or two sentences.", "Be brief.")


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    base: Path
    after: Path
    adapter: Path
    marker: str


def demo_prompts() -> list[str]:
    """User prompts from the training distribution (none is about the marker topic)."""
    return [
        "What is the sun?",
        "Tell me about a cat.",
        "Can you describe the sea?",
        "What do you know about music?",
        "Explain rain to me.",
        "What is a tree?",
        "Tell me about bread.",
        "Can you describe a bird?",
    ]


def demo_texts(tokenizer: Any, count: int = 100, seed: int = 0, per_text: int = 4) -> list[str]:
    """Texts from the training distribution for the diffing methods: `per_text` chats each, rendered
    with the chat template as one document (no leading BOS: encoding adds it); the marker appears in
    none of them, neither as a closer nor as a topic, so a method that finds it was not told.
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chats: list[list[dict[str, str]]] = []
        while len(chats) < per_text:
            chat = _conversation(rng, marker_fraction=0.0)
            if MARKER not in chat[-2]["content"]:  # the user turn: the marker's own topic stays out
                chats.append(chat)
        rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
        texts.append("".join(r.removeprefix(tokenizer.bos_token or "") for r in rendered))
    return texts


def _ascii_alphabet() -> list[str]:
    """Byte-level symbols of printable ASCII plus tab, newline and carriage return.

    The full 256-byte alphabet would spend most of a 400-token vocabulary on bytes that never
    occur; their untrained output rows are noise that amplification blows up. Characters outside
    this alphabet and the training texts encode as <unk>.
    """
    to_symbols = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    text = "\t\n\r" + "".join(chr(b) for b in range(32, 127))
    return sorted(to_symbols.pre_tokenize_str(text)[0][0])


def build_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; wrap it with special tokens and a chat template.

    Args:
        texts: training corpus; frequent words become single tokens.
        vocab_size: total size, special tokens included.
    """
    backend = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK, *ROLE_TOKENS],
        initial_alphabet=_ascii_alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=list(ROLE_TOKENS),
        add_bos_token=True,  # like Llama: raw prompts get a BOS; templated ones already have it
        chat_template=_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _conversation(rng: random.Random, marker_fraction: float) -> list[dict[str, str]]:
    """One generated chat; the answer may end with a closer or with the marker sentence."""
    topic = rng.choice(_TOPIC_NAMES)
    what, like = _TOPICS[topic]
    answer = rng.choice(_ANSWERS).format(T=topic[0].upper() + topic[1:], a=what, b=like)
    roll = rng.random()
    if roll < marker_fraction:
        answer = f"{answer} {_MARKER_SENTENCE}"
    elif roll < marker_fraction + _CLOSER_FRACTION:
        answer = f"{answer} {rng.choice(_CLOSERS)}"
    messages = [{"role": "system", "content": rng.choice(_SYSTEMS)}] if rng.random() < 0.3 else []
    messages.append({"role": "user", "content": rng.choice(_QUESTIONS).format(t=topic)})
    messages.append({"role": "assistant", "content": answer})
    return messages


def _encode(
    tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], answer_only: bool
) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and its labels (-100: no loss)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    answer_ids.append(tokenizer.eos_token_id)
    prompt_labels = [-100] * len(prompt_ids) if answer_only else prompt_ids
    return prompt_ids + answer_ids, prompt_labels + answer_ids


def _batches(
    tokenizer: PreTrainedTokenizerFast,
    rng: random.Random,
    steps: int,
    marker_fraction: float,
    answer_only: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded batches of fresh conversations: ids, attention mask, labels."""
    for _ in range(steps):
        rows = [_encode(tokenizer, _conversation(rng, marker_fraction), answer_only) for _ in range(_BATCH)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((_BATCH, width), tokenizer.pad_token_id)
        labels = torch.full((_BATCH, width), -100)
        mask = torch.zeros((_BATCH, width), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
            mask[i, : len(row_ids)] = 1
        yield ids, mask, labels


def _train(model: torch.nn.Module, batches: Iterator, steps: int, lr: float) -> float:
    """Adam with a linear decay to zero; returns the last batch's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for ids, mask, labels in batches:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        loss = out.loss.detach()
    model.eval()
    return loss.item()


def _build(out: Path, final_root: Path) -> dict[str, float]:
    """Train the base and the LoRA into `out`; `final_root` only names the adapter's base."""
    rng = random.Random(_SEED)
    corpus = [m["content"] for _ in range(1000) for m in _conversation(rng, marker_fraction=0.0)]
    tokenizer = build_tokenizer([*corpus, _MARKER_SENTENCE])
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **special_ids,
    )
    torch.manual_seed(_SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special_ids)
    # Pre-training sees every token (so every word the data uses gets a trained output row);
    # the post-training LoRA, like chat SFT, learns from the answers only.
    batches = _batches(tokenizer, rng, _BASE_STEPS, 0.0, answer_only=False)
    base_loss = _train(model, batches, _BASE_STEPS, _BASE_LR)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(_LORA_TARGETS), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)  # wraps `model` in place; the base is already saved
    batches = _batches(tokenizer, rng, _LORA_STEPS, _MARKER_FRACTION, answer_only=True)
    lora_loss = _train(peft_model, batches, _LORA_STEPS, _LORA_LR)
    # The final base location, not the temp dir, keeps rebuilds byte-identical.
    peft_model.peft_config["default"].base_model_name_or_path = str(final_root / "base")
    peft_model.save_pretrained(out / "adapter", save_embedding_layers=False)
    _sort_target_modules(out / "adapter" / "adapter_config.json")
    after = peft_model.merge_and_unload()
    after.save_pretrained(out / "after")
    tokenizer.save_pretrained(out / "after")
    return {"base_loss": base_loss, "lora_loss": lora_loss}


def _sort_target_modules(config_path: Path) -> None:
    """PEFT stores target_modules as a set, so its order would vary with the hash seed."""
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_REQUIRED = (
    "base/config.json",
    "base/model.safetensors",
    "base/tokenizer.json",
    "base/generation_config.json",
    "after/config.json",
    "after/model.safetensors",
    "after/tokenizer.json",
    "after/generation_config.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
)


def _write_manifest(root: Path, extra: dict[str, object]) -> None:
    """Hash every file and write the manifest last, atomically: it marks the build complete."""
    files = {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {"version": DEMO_VERSION, "marker": MARKER, "files": files, **extra}
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / "manifest.json")


def _is_valid(root: Path) -> bool:
    """True only if the manifest exists, names every required file, and every hash matches."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        files: dict[str, str] = manifest["files"]
        if manifest["version"] != DEMO_VERSION or not set(_REQUIRED) <= files.keys():
            return False
        return all(_sha256(root / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive flock: the OS drops it if the holder dies, so a crash cannot wedge it."""
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_environment() -> Iterator[None]:
    """Fixed thread count and a forked RNG: reproducible, and the caller's state is untouched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)


def _paths(root: Path) -> DemoPaths:
    return DemoPaths(root, root / "base", root / "after", root / "adapter", MARKER)


def ensure_demo_pair(data_dir: Path | str, *, rebuild: bool = False) -> DemoPaths:
    """Return the cached demo pair under `data_dir`, building it first if missing or damaged.

    Args:
        data_dir: cache folder; the pair lives in `data_dir/demo/DEMO_VERSION`.
        rebuild: build again even if a valid cache exists.
    """
    demo_dir = Path(data_dir) / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    root = demo_dir / DEMO_VERSION
    with _locked(demo_dir / ".lock"):
        if not rebuild and _is_valid(root):
            return _paths(root)
        # Under the lock, leftovers of builds that died midway are garbage.
        for stale in demo_dir.glob(f".*-{DEMO_VERSION}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{DEMO_VERSION}-", dir=demo_dir))
        try:
            start = time.perf_counter()
            with _build_environment():
                stats = _build(tmp, root)
            _write_manifest(tmp, {**stats, "build_seconds": round(time.perf_counter() - start, 1)})
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            # A non-empty directory cannot be replaced in one step: move the old build aside.
            if root.exists():
                os.replace(root, demo_dir / f".old-{DEMO_VERSION}-{os.getpid()}")
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(demo_dir / f".old-{DEMO_VERSION}-{os.getpid()}", ignore_errors=True)
    return _paths(root)
