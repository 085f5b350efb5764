"""vLLM's adapter and tokenizer routes on the demo pair: /v1/load_lora_adapter,
/v1/unload_lora_adapter, /tokenize, /detokenize, /tokenizer_info (what lm-eval's remote tokenizer
reads), with OpenAI's error shape on every failure."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from tests.test_api import wait_ready

from app.demo.build import DEMO_VERSION
from app.main import create_app
from app.settings import Settings

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the sun?"},
]


@pytest.fixture(scope="module")
def data_dir(demo_data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    shutil.copytree(demo_data_dir / "demo", d / "demo")  # a copy: adapters must live under DATA_DIR
    return d


@pytest.fixture(scope="module")
def adapter_dir(data_dir):
    return data_dir / "demo" / DEMO_VERSION / "adapter"


@pytest.fixture(scope="module")
def tok(data_dir):
    """The after model's tokenizer, loaded on its own (not the server's object)."""
    return AutoTokenizer.from_pretrained(data_dir / "demo" / DEMO_VERSION / "after")


@pytest.fixture(scope="module")
def client(data_dir):
    with TestClient(create_app(Settings(data_dir=data_dir))) as c:
        wait_ready(c)
        yield c


def error(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, exactly its four keys; returns the error object."""
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err
    assert err["code"] == code, err
    return err


def ids_of(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) answers a BatchEncoding in transformers 5, a list before."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def adapter_names(client) -> list[str]:
    return [a["name"] for a in client.get("/adapters").json()["adapters"]]


# --- adapters -----------------------------------------------------------------------------------


def test_load_use_and_unload_an_adapter(client, adapter_dir):
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": str(adapter_dir)})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == "Success: LoRA adapter 'mine' added successfully."
    assert "mine" in adapter_names(client)
    assert client.get("/adapters/mine").json()["source"] == str(adapter_dir)
    # a model id now
    assert client.post("/tokenize", json={"model": "mine", "prompt": "hi"}).status_code == 200

    again = client.post("/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": str(adapter_dir)})
    assert "already been loaded" in error(again, 400, param="lora_name")["message"]
    inplace = {"lora_name": "mine", "lora_path": str(adapter_dir), "load_inplace": True}
    assert client.post("/v1/load_lora_adapter", json=inplace).status_code == 200
    assert adapter_names(client).count("mine") == 1

    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "mine", "lora_int_id": 7})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == "Success: LoRA adapter 'mine' removed successfully."
    assert "mine" not in adapter_names(client)
    assert client.get("/adapters/mine").status_code == 404
    error(client.post("/tokenize", json={"model": "mine", "prompt": "hi"}), 404, "model", "model_not_found")
    gone = client.post("/v1/unload_lora_adapter", json={"lora_name": "mine"})
    assert error(gone, 404)["type"] == "not_found"


def test_a_relative_path_resolves_under_data_dir(client):
    body = {"lora_name": "rel", "lora_path": f"demo/{DEMO_VERSION}/adapter"}
    assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert "rel" in adapter_names(client)
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "rel"}).status_code == 200


def test_adapter_paths_outside_the_roots_are_400(client, data_dir, adapter_dir, tmp_path):
    outside = tmp_path / "evil"
    shutil.copytree(adapter_dir, outside)  # a real adapter: only its place is wrong
    (data_dir / "link").symlink_to(outside, target_is_directory=True)
    try:
        for path in (str(outside), str(data_dir / "link"), "demo/../../evil", "/etc"):
            r = client.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
            error(r, 400, param="lora_path")
            # The same answer as for a missing path (no existence oracle), no real path, no roots.
            assert r.json()["error"]["message"] == f"no adapter at {path!r} under the allowed folders"
    finally:
        (data_dir / "link").unlink()
    assert "bad" not in adapter_names(client)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"lora_name": "x"}, "lora_path"),
        ({"lora_path": "demo"}, "lora_name"),
        ({"lora_name": "a/b", "lora_path": "demo"}, "lora_name"),
        ({"lora_name": "", "lora_path": "demo"}, "lora_name"),
        ({"lora_name": "x", "lora_path": "demo", "base_model_name": "y"}, "base_model_name"),
        ({"lora_name": "after", "lora_path": "demo"}, "lora_name"),  # `model` could never reach it
        ({"lora_name": "lda", "lora_path": "demo"}, "lora_name"),
        ({"lora_name": "ref_f7c1f2c5090b", "lora_path": "demo"}, "lora_name"),  # configs' path adapters
    ],
)
def test_bad_load_bodies_are_400_naming_the_field(client, body, param):
    error(client.post("/v1/load_lora_adapter", json=body), 400, param=param)


def test_bad_unload_bodies_are_400(client):
    error(client.post("/v1/unload_lora_adapter", json={}), 400, param="lora_name")
    error(client.post("/v1/unload_lora_adapter", json={"lora_name": "demo", "x": 1}), 400, param="x")
    assert "demo" in adapter_names(client)


# --- /tokenize ----------------------------------------------------------------------------------


def test_tokenize_text_matches_the_tokenizer(client, tok):
    text = "What is the sun? A pineapple."
    r = client.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # the default adds BOS, as /v1/completions encodes text
    assert body == {"count": len(ids), "max_model_len": 256, "tokens": ids, "token_strs": None}

    plain = client.post(
        "/tokenize", json={"model": "after", "prompt": text, "add_special_tokens": False}
    ).json()
    assert plain["tokens"] == tok(text, add_special_tokens=False)["input_ids"] == ids[1:]

    strs = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert strs["token_strs"] == tok.convert_ids_to_tokens(ids) and strs["token_strs"][0] == "<s>"


def test_tokenize_chat_matches_the_chat_template(client, tok):
    r = client.post("/tokenize", json={"messages": MESSAGES})
    assert r.status_code == 200, r.text
    expected = ids_of(tok.apply_chat_template(MESSAGES, add_generation_prompt=True))
    assert r.json()["tokens"] == expected and r.json()["count"] == len(expected)
    assert expected.count(tok.bos_token_id) == 1  # the template's BOS, not a second one

    no_prompt = client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == ids_of(tok.apply_chat_template(MESSAGES, add_generation_prompt=False))
    assert no_prompt["tokens"] != expected

    content = [{"type": "text", "text": "What is "}, {"type": "text", "text": "the sun?"}]
    parts = [{"role": "user", "content": content}]
    joined = client.post("/tokenize", json={"messages": parts}).json()["tokens"]
    assert joined == client.post("/tokenize", json={"messages": MESSAGES[1:]}).json()["tokens"]

    prefill = [*MESSAGES, {"role": "assistant", "content": "The sun is"}]
    body = {"messages": prefill, "add_generation_prompt": False, "continue_final_message": True}
    cont = client.post("/tokenize", json=body).json()["tokens"]
    assert cont == ids_of(tok.apply_chat_template(prefill, continue_final_message=True))
    assert cont[-1] != tok.eos_token_id  # left open for the model to continue

    extra = client.post("/tokenize", json={"messages": MESSAGES, "chat_template_kwargs": {"foo": 1}}).json()
    assert extra["tokens"] == expected


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "messages": MESSAGES}, "prompt"),  # `messages` makes it the chat form
        ({"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}], "x": 1}, "x"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, None),
        ({"messages": MESSAGES, "continue_final_message": True}, None),  # with add_generation_prompt
        ({"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),  # as /v1/chat/completions
    ],
)
def test_bad_tokenize_bodies_are_400(client, body, param):
    r = client.post("/tokenize", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


def test_a_non_object_body_is_400(client):
    r = client.post("/tokenize", json=["hi"])
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_model_picks_the_tokenizer_side(client, monkeypatch):
    pair = client.app.state.pair
    # The demo's two tokenizers agree, so tell the sides apart by the model each one reports.
    monkeypatch.setattr(pair.before.model.config, "max_position_embeddings", 123)
    text = {"prompt": "hello"}
    for model in ("before", pair.before.model_id):
        assert client.post("/tokenize", json={**text, "model": model}).json()["max_model_len"] == 123
    for model in ("after", pair.after.model_id, "lda", "lda@2", "demo", "lda@1.5@demo", None):
        r = client.post("/tokenize", json={**text, "model": model})
        assert r.status_code == 200 and r.json()["max_model_len"] == 256, (model, r.text)
    before = client.post("/detokenize", json={"model": "before", "tokens": [1]})
    assert before.status_code == 200


def test_unknown_and_malformed_models(client):
    for route, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        error(client.post(route, json={**body, "model": "nope"}), 404, "model", "model_not_found")
        error(client.post(route, json={**body, "model": "lda@1@nope"}), 404, "model", "model_not_found")
        assert (
            "not a number"
            in error(client.post(route, json={**body, "model": "lda@abc"}), 400, "model")["message"]
        )


# --- /detokenize --------------------------------------------------------------------------------


def test_detokenize_round_trips_tokenize(client, tok):
    text = "What is the sun? A pineapple."
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": plain}).json() == {"prompt": text}
    with_bos = client.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": with_bos}).json()["prompt"] == "<s>" + text
    chat = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert client.post("/detokenize", json={"tokens": chat}).json()["prompt"] == rendered
    assert client.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_bad_token_ids_are_400_naming_the_field(client, tok):
    vocab = len(tok)
    err = error(client.post("/detokenize", json={"tokens": [5, vocab]}), 400, param="tokens.1")
    assert str(vocab) in err["message"] and "vocabulary" in err["message"]
    error(client.post("/detokenize", json={"tokens": [5, -1]}), 400, param="tokens.1")
    error(client.post("/detokenize", json={"tokens": ["a"]}), 400, param="tokens.0")
    error(client.post("/detokenize", json={"tokens": [5, True]}), 400, param="tokens.1")  # not token 1
    r = client.post("/v1/completions", json={"model": "after", "prompt": [True]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text
    error(client.post("/detokenize", json={}), 400, param="tokens")
    error(client.post("/detokenize", json={"tokens": [1], "prompt": "x"}), 400, param="prompt")


# --- /tokenizer_info and lm-eval's remote tokenizer ---------------------------------------------


def test_tokenizer_info_describes_the_after_tokenizer(client, tok):
    r = client.get("/tokenizer_info")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["tokenizer_class"] == type(tok).__name__
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == tok.model_max_length
    assert info["add_bos_token"] is True  # the post-processor adds it, whatever the attribute says
    assert not [k for k in info if k.endswith("_file")]  # no server file paths


def test_lm_eval_remote_tokenizer_flow(client, tok):
    """What lm-eval's RemoteTokenizer does: it needs `eos_token` in /tokenizer_info, encodes with
    add_special_tokens false, takes the first id of the encoded special token as its id, decodes
    with /detokenize and renders the chat template itself."""
    info = client.get("/tokenizer_info").json()
    assert "eos_token" in info

    def encode(text: str) -> list[int]:
        return client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    assert encode(info["eos_token"])[0] == tok.eos_token_id
    assert encode(info["bos_token"])[0] == tok.bos_token_id
    assert encode("test")  # its support check
    ids = encode("Tell me about the sun.")
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "Tell me about the sun."

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(info["chat_template"])
    special = {"bos_token": info["bos_token"], "eos_token": info["eos_token"]}
    rendered = template.render(messages=MESSAGES, add_generation_prompt=True, **special)
    assert rendered == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_template_failures_are_400_on_messages(client, monkeypatch):
    tokenizer = client.app.state.pair.after.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    err = error(client.post("/tokenize", json={"messages": MESSAGES}), 400, param="messages")
    assert "roles must alternate" in err["message"]
    monkeypatch.setattr(tokenizer, "chat_template", None)
    assert (
        "no chat template"
        in error(client.post("/tokenize", json={"messages": MESSAGES}), 400, "messages")["message"]
    )
    assert client.post("/tokenize", json={"prompt": "still fine"}).status_code == 200
