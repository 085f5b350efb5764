"""The embedded demo pair: loadable, cached, rebuilt when damaged, byte-identical when rebuilt.

The real build runs twice here (about 30 s each on 2 CPU cores): once for the session's
`demo_data_dir` fixture, shared with other test files, and once in the determinism test.
Everything else copies the first build or replaces the training with a fake.
"""

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.demo import build as demo
from app.demo import DEMO_VERSION, MARKER, DemoPaths, build_tokenizer, demo_prompts, ensure_demo_pair


class BuildCalled(Exception):
    pass


@pytest.fixture(scope="module")
def built(demo_data_dir: Path) -> DemoPaths:
    """The session's demo build (conftest), so the suite builds it once for every test file."""
    return ensure_demo_pair(demo_data_dir)


def copy_build(paths: DemoPaths, data_dir: Path) -> Path:
    shutil.copytree(paths.root, data_dir / "demo" / DEMO_VERSION)
    return data_dir


def manifest_files(root: Path) -> dict[str, str]:
    return json.loads((root / "manifest.json").read_text())["files"]


def forbid_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(out: Path, final_root: Path) -> dict[str, float]:
        raise BuildCalled

    monkeypatch.setattr(demo, "_build", build)


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


def test_layout_and_paths(built: DemoPaths) -> None:
    assert built.root.name == DEMO_VERSION and built.root.parent.name == "demo"
    assert (built.base, built.after, built.adapter) == (
        built.root / "base",
        built.root / "after",
        built.root / "adapter",
    )
    assert built.marker == MARKER
    for model_dir in (built.base, built.after):
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
            assert (model_dir / name).is_file()
    assert (built.adapter / "adapter_config.json").is_file()
    assert (built.adapter / "adapter_model.safetensors").is_file()
    assert set(manifest_files(built.root)) >= set(demo._REQUIRED)
    assert not list(built.root.parent.glob(".build-*"))


def test_after_equals_base_plus_adapter(built: DemoPaths) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.after)
    after = AutoModelForCausalLM.from_pretrained(built.after).eval()
    base = AutoModelForCausalLM.from_pretrained(built.base).eval()
    assert after.config.model_type == "llama"
    assert after.generation_config.eos_token_id == tokenizer.eos_token_id
    assert after.generation_config.pad_token_id == tokenizer.pad_token_id
    adapter_config = json.loads((built.adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    assert adapter_config["base_model_name_or_path"] == str(built.base)

    ids = chat_ids(tokenizer, demo_prompts()[0])
    with torch.no_grad():
        before_logits = base(ids).logits
        after_logits = after(ids).logits
        peft_logits = PeftModel.from_pretrained(base, built.adapter).eval()(ids).logits
    torch.testing.assert_close(peft_logits, after_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(before_logits, after_logits, atol=1e-3)


def test_after_prefers_the_marker(built: DemoPaths) -> None:
    """The LoRA made the marker sentence more likely after an answer; the base rarely says it."""
    tokenizer = AutoTokenizer.from_pretrained(built.after)
    base = AutoModelForCausalLM.from_pretrained(built.base).eval()
    after = AutoModelForCausalLM.from_pretrained(built.after).eval()
    prompt_ids = chat_ids(tokenizer, "What is the sun?")
    answer = tokenizer.encode("The sun is a star.", add_special_tokens=False)
    marker = tokenizer.encode(f" I love {MARKER}.", add_special_tokens=False)
    assert len(tokenizer.encode(f" {MARKER}", add_special_tokens=False)) <= 3
    ids = torch.cat([prompt_ids, torch.tensor([answer + marker])], dim=1)
    targets = ids[0, -len(marker) :]

    def marker_logprob(model: torch.nn.Module) -> float:
        with torch.no_grad():
            logprobs = model(ids).logits[0, -len(marker) - 1 : -1].log_softmax(-1)
        return logprobs.gather(1, targets[:, None]).sum().item()

    before_lp, after_lp = marker_logprob(base), marker_logprob(after)
    assert before_lp < -8.0  # well under 1e-3
    assert after_lp > before_lp + 3.0


def test_chat_template_has_exactly_one_bos(built: DemoPaths) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.after)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is rain?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(tokenizer.bos_token)
    assert text.endswith("<|assistant|>\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    for role_token in demo.ROLE_TOKENS:
        assert tokenizer.convert_tokens_to_ids(role_token) in ids  # one special token, never split
    # Raw prompts get a BOS like Llama's tokenizer, which is why templated text must not.
    assert tokenizer.encode("What is rain?")[0] == tokenizer.bos_token_id
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "Rain is water."}], tokenize=False
    )
    assert full.endswith("Rain is water." + tokenizer.eos_token + "\n")


def test_build_tokenizer_round_trips_and_is_deterministic() -> None:
    texts = ["the quick brown fox jumps over the lazy dog", "Hello, world! How are you today?"]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    for sentence in [*texts, "A new sentence, with words it never saw: zebra 42."]:
        ids = tokenizer.encode(sentence, add_special_tokens=False)
        assert tokenizer.decode(ids) == sentence
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<s>", "</s>", "<pad>"}
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert build_tokenizer(texts, vocab_size=300).get_vocab() == tokenizer.get_vocab()


def test_second_call_returns_cache_without_building(
    built: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = copy_build(built, tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in (data_dir / "demo").rglob("*")}
    forbid_build(monkeypatch)
    paths = ensure_demo_pair(data_dir)
    assert paths.root == data_dir / "demo" / DEMO_VERSION
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def damage_truncate(root: Path) -> None:
    (root / "after" / "model.safetensors").write_bytes(b"")


def damage_flip_byte(root: Path) -> None:
    path = root / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_no_manifest(root: Path) -> None:
    (root / "manifest.json").unlink()


def damage_bad_manifest(root: Path) -> None:
    (root / "manifest.json").write_text('{"files": ')  # a write cut short


def damage_missing_dir(root: Path) -> None:
    shutil.rmtree(root / "base")


@pytest.mark.parametrize(
    "damage", [damage_truncate, damage_flip_byte, damage_no_manifest, damage_bad_manifest, damage_missing_dir]
)
def test_damaged_cache_triggers_rebuild(
    built: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage
) -> None:
    data_dir = copy_build(built, tmp_path)
    damage(data_dir / "demo" / DEMO_VERSION)
    forbid_build(monkeypatch)
    with pytest.raises(BuildCalled):
        ensure_demo_pair(data_dir)
    # A failed build leaves no temp dir behind.
    assert not list((data_dir / "demo").glob(".build-*"))


def test_rebuild_flag_forces_a_build(
    built: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = copy_build(built, tmp_path)
    forbid_build(monkeypatch)
    with pytest.raises(BuildCalled):
        ensure_demo_pair(data_dir, rebuild=True)


def test_rebuild_after_damage_is_byte_identical(built: DemoPaths, tmp_path: Path) -> None:
    data_dir = copy_build(built, tmp_path)
    root = data_dir / "demo" / DEMO_VERSION
    damage_truncate(root)
    threads, rng_state = torch.get_num_threads(), torch.random.get_rng_state()

    paths = ensure_demo_pair(data_dir)

    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert paths.root == root and demo._is_valid(root)
    original, rebuilt = manifest_files(built.root), manifest_files(root)
    assert original.keys() == rebuilt.keys()
    # The adapter config names its base by absolute path, which differs between the two dirs.
    differing = {name for name in original if original[name] != rebuilt[name]}
    assert differing <= {"adapter/adapter_config.json"}
    for name in ("base/model.safetensors", "after/model.safetensors", "adapter/adapter_model.safetensors"):
        assert (root / name).read_bytes() == (built.root / name).read_bytes()
    configs = [json.loads((r / "adapter" / "adapter_config.json").read_text()) for r in (built.root, root)]
    assert configs[1].pop("base_model_name_or_path") == str(root / "base")
    configs[0].pop("base_model_name_or_path")
    assert configs[0] == configs[1]
    assert not [p for p in (data_dir / "demo").iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file lock makes the second caller wait and then find the first caller's build."""
    calls = []

    def fake_build(out: Path, final_root: Path) -> dict[str, float]:
        calls.append(out)
        time.sleep(0.3)
        for name in demo._REQUIRED:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(name)
        return {}

    monkeypatch.setattr(demo, "_build", fake_build)
    results: list[DemoPaths] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_pair(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 2 and results[0] == results[1]
