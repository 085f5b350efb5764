"""The OpenAI-compatible routes with the `openai` SDK as the client, against a live server
(`python -m app` on the demo pair, with an API key): every lens by model id, the equalities with
the native routes, n and usage, streaming, both logprobs layouts, lm-eval's echo payload, the
diffing toolkit's compile-then-chat flow, and the SDK's typed errors."""

from __future__ import annotations

import math
import shutil

import httpx
import openai
import pytest

from amplification import PRESETS_DIR
from tests.test_cli import free_port, running_server, server_env

KEY = "sdk-key"
SUN = [{"role": "user", "content": "Tell me about the sun."}]
# Greedy unless a test samples; short completions keep the demo pair fast.
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def server(demo_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("openai")
    shutil.copytree(demo_data_dir / "demo", data / "demo")  # the demo adapter must live under DATA_DIR
    port = free_port()
    env = server_env(PORT=str(port), DATA_DIR=str(data), API_KEY=KEY, QUEUE_SIZE="64")
    with running_server(env, port, data / "server.log") as url:
        yield url, data


@pytest.fixture(scope="module")
def sdk(server):
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def native(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


def chat(sdk, model, **kw):
    body = {"messages": SUN, **GREEDY, **kw}
    return sdk.chat.completions.create(model=model, **body)


def generate_lda(native, **body):
    r = native.post("/generate_lda", json={"prompt": "Tell me about the sun.", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_list_every_lens(sdk, server):
    models = {m.id: m for m in sdk.models.list()}
    assert {"demo/after", "after", "demo/before", "before", "lda", "demo"} <= set(models)
    assert models["after"].parent == "demo/after" and models["lda"].owned_by
    adapter = models["demo"]  # the demo LoRA, listed as vLLM lists LoRA modules
    assert adapter.parent == "demo/before" and adapter.root.endswith("adapter")


def test_greedy_lda_at_0_is_after_and_at_minus_1_is_before(sdk):
    after = chat(sdk, "after").choices[0].message.content
    before = chat(sdk, "before").choices[0].message.content
    assert after != before  # else the equalities below test nothing
    assert chat(sdk, "lda@0").choices[0].message.content == after
    assert chat(sdk, "demo/after").choices[0].message.content == after
    assert chat(sdk, "lda@-1").choices[0].message.content == before
    assert chat(sdk, "lda", extra_body={"alpha": 0}).choices[0].message.content == after


def test_seeded_choices_equal_generate_lda_rows(sdk, native):
    sampling = {"temperature": 1.0, "top_p": 1.0, "seed": 41}
    out = chat(sdk, "lda", n=4, max_tokens=30, extra_body={"alpha": 2}, **sampling)
    body = generate_lda(native, alpha=2, n=4, max_new_tokens=30, **sampling)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in out.choices]
    assert texts == [row["completion"] for row in body["results"]]
    assert len(set(texts)) > 1  # the seeds differ per choice
    # `lda@2` in the name is the same lens as `lda` with alpha 2 in the body.
    again = chat(sdk, "lda@2", n=4, max_tokens=30, **sampling)
    assert [c.message.content for c in again.choices] == texts
    assert out.usage.completion_tokens == sum(row["tokens_generated"] for row in body["results"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completions_take_raw_prompts_like_generate_lda_without_template(sdk, native):
    sampling = {"temperature": 1.0, "top_p": 1.0, "seed": 7}
    out = sdk.completions.create(model="lda@1.5", prompt="The sun is", max_tokens=20, **sampling)
    body = generate_lda(
        native, prompt="The sun is", alpha=1.5, max_new_tokens=20, apply_chat_template=False, **sampling
    )
    assert out.choices[0].text == body["completion"]
    assert out.choices[0].finish_reason == ("length" if body["results"][0]["finish_reason"] == "length" else "stop")


def test_adapter_models_merge_the_adapter(sdk, native):
    # `demo` merged at weight 1 = /amplification/generate's column for it; lda@ALPHA@demo =
    # adapter-mode /generate_lda.
    sampling = {"temperature": 1.0, "top_p": 1.0, "seed": 3}
    merged = chat(sdk, "demo", max_tokens=30, **sampling).choices[0].message.content
    r = native.post("/amplification/generate", json={
        "prompt": "Tell me about the sun.", "configs": ["demo"], "include_base": False,
        "max_new_tokens": 30, **sampling})  # fmt: skip
    assert r.status_code == 200, r.text
    assert merged == r.json()["columns"][0]["results"][0]["completion"]
    amplified = chat(sdk, "lda@2@demo", max_tokens=30, **sampling).choices[0].message.content
    assert amplified == generate_lda(native, adapter="demo", alpha=2, max_new_tokens=30, **sampling)["completion"]
    via_body = chat(sdk, "lda@2", max_tokens=30, extra_body={"adapter": "demo"}, **sampling)
    assert via_body.choices[0].message.content == amplified


def test_toolkit_flow_compile_then_chat_with_the_lora_name(sdk, native):
    r = native.post("/v1/compile_and_load_amplification",
                    json={"config_path": str(PRESETS_DIR / "default_3x.yaml"), "variant": "demo"})  # fmt: skip
    assert r.status_code == 200, r.text
    lora_name = r.json()["lora_name"]
    assert lora_name in {m.id for m in sdk.models.list()}
    sampling = {"temperature": 1.0, "top_p": 1.0, "seed": 11}
    out = chat(sdk, lora_name, max_tokens=30, **sampling).choices[0].message.content
    r = native.post("/amplification/generate", json={
        "prompt": "Tell me about the sun.", "configs": [lora_name], "include_base": False,
        "max_new_tokens": 30, **sampling})  # fmt: skip
    assert out == r.json()["columns"][0]["results"][0]["completion"]
    tripled = [c.message.content for c in chat(sdk, lora_name, n=8, max_tokens=30, **sampling).choices]
    once = [c.message.content for c in chat(sdk, "demo", n=8, max_tokens=30, **sampling).choices]
    assert tripled != once  # the config's 3x, not the adapter at 1x


def test_streams_concatenate_to_the_response(sdk):
    kw = {"n": 2, "max_tokens": 30, "temperature": 1.0, "seed": 5, "extra_body": {"alpha": 2}}
    whole = chat(sdk, "lda", **kw)
    parts: dict[int, list[str]] = {0: [], 1: []}
    finish: dict[int, str] = {}
    usage = None
    with chat(sdk, "lda", stream=True, stream_options={"include_usage": True}, **kw) as stream:
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if not chunk.choices:
                usage = chunk.usage
            for c in chunk.choices:
                parts[c.index].append(c.delta.content or "")
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
    assert ["".join(parts[i]) for i in (0, 1)] == [c.message.content for c in whole.choices]
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    text = sdk.completions.create(model="after", prompt="The sun", max_tokens=20, temperature=0)
    streamed = sdk.completions.create(model="after", prompt="The sun", max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_chat_logprobs_layout(sdk):
    out = chat(sdk, "lda@2", logprobs=True, top_logprobs=3).choices[0]
    content = out.logprobs.content
    assert len(content) == chat(sdk, "lda@2").usage.completion_tokens
    assert "".join(t.token for t in content).startswith(out.message.content)
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 3
        top = [x.logprob for x in t.top_logprobs]
        assert top == sorted(top, reverse=True) and t.logprob == pytest.approx(top[0])  # greedy: the best
        assert math.fsum(math.exp(x) for x in top) <= 1 + 1e-6
    assert chat(sdk, "lda@2").choices[0].logprobs is None


def test_completion_logprobs_layout_and_stream(sdk):
    kw = {"model": "lda@2", "prompt": "The sun is", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    out = sdk.completions.create(**kw).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens).startswith(out.text)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and len(top) <= 3 and max(top.values()) == logprob
    streamed = [c.choices[0].logprobs for c in sdk.completions.create(stream=True, **kw)]
    tokens = [t for chunk in streamed if chunk for t in chunk.tokens]
    logprobs = [x for chunk in streamed if chunk for x in chunk.token_logprobs]
    assert tokens == lp.tokens and logprobs == lp.token_logprobs


def test_lm_eval_loglikelihood_payload(sdk, native):
    # lm-eval's exact body: token-id prompts in a batch, one generated token, echo + logprobs.
    ids = native.post("/tokenize", json={"model": "after", "prompt": "The sun is a star."}).json()["tokens"]
    other = ids[:-2]
    payload = {"model": "lda@2", "prompt": [ids, other], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}  # fmt: skip
    r = native.post("/v1/completions", json=payload)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for choice, prompt in zip(choices, (ids, other)):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1  # the prompt, then the generated token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    # The continuation's loglikelihood as lm-eval sums it, under three lenses: alpha 0 is the
    # after model exactly, alpha -1 the before model exactly (logit_diff is exact there).
    def loglik(model):
        body = {**payload, "model": model, "prompt": [ids]}
        lp = native.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
        return lp[len(other) : -1]

    assert loglik("lda@0") == loglik("after")
    assert loglik("lda@-1") == loglik("before")
    assert loglik("lda@2") != loglik("after")


def test_echo_scores_equal_the_decode_loops_logprobs(sdk, native):
    # Uncached scoring of prompt + completion vs the cached decode that sampled it: the same
    # distribution at each generated position. Both are fp32 from the same weights; they differ
    # only in attention's summation order (whole sequence vs KV cache), ~1e-6 of logits of size
    # ~10, so 1e-4 bounds it; a wrong position or alpha moves a logprob by > 1e-2.
    body = generate_lda(native, prompt="The sun is", alpha=2, temperature=0, max_new_tokens=10,
                        apply_chat_template=False, details=True)  # fmt: skip
    details = body["results"][0]["details"]
    prompt = native.post("/tokenize", json={"model": "after", "prompt": "The sun is"}).json()["tokens"]
    generated = [d["token_id"] for d in details]
    payload = {"model": "lda@2", "prompt": [prompt + generated], "max_tokens": 0, "echo": True, "logprobs": 0}
    scored = native.post("/v1/completions", json=payload).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(scored) == len(prompt) + len(generated) >= len(prompt) + 2
    assert scored[len(prompt) :] == pytest.approx([d["logprob_amplified"] for d in details], abs=1e-4)
    # And the completion route's own logprobs of the same greedy tokens are the decode's.
    gen = sdk.completions.create(model="lda@2", prompt="The sun is", max_tokens=10, temperature=0, logprobs=0)
    assert gen.choices[0].logprobs.token_logprobs == [d["logprob_amplified"] for d in details]


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"model": "lda@nan"}, "model"),
        ({"model": "lda@abc"}, "model"),
        ({"model": "after", "extra_body": {"alpha": 2}}, "alpha"),
        ({"model": "lda@2", "extra_body": {"alpha": 1}}, "alpha"),
        ({"model": "lda", "temperature": -1}, "temperature"),
        ({"model": "lda", "max_tokens": 10**6}, "max_tokens"),
        ({"model": "lda", "n": 5000}, "n"),
        ({"model": "lda", "presence_penalty": 1.0}, None),
        ({"model": "lda", "tools": [{"type": "function", "function": {"name": "f"}}]}, None),
        ({"model": "lda", "extra_body": {"chat_template_kwargs": {"tokenize": True}}}, "chat_template_kwargs"),
    ],
)
def test_bad_requests_raise_bad_request_error(sdk, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(messages=SUN, **{"max_tokens": 4, **kw})
    assert err.value.status_code == 400 and err.value.body["message"]
    if param is not None:
        assert err.value.body["param"] == param, err.value.body


def test_typed_errors_for_unknown_models_and_keys(sdk, server):
    with pytest.raises(openai.NotFoundError) as err:
        chat(sdk, "no-such-model")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        chat(sdk, "lda@2@no-such-adapter")
    with openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with pytest.raises(openai.BadRequestError):  # a prompt over the context window
        sdk.completions.create(model="after", prompt=[[5] * 5000], max_tokens=4)


def test_metrics_count_the_routes(sdk, native):
    chat(sdk, "after", max_tokens=2)
    text = native.get("/metrics").text
    assert 'route="/v1/chat/completions"' in text and 'lda_requests_total{route="/v1/models"' in text


def test_503_while_loading_and_429_when_full_are_the_sdks_typed_errors(tiny_dirs, tmp_path, monkeypatch):
    # In-process (the SDK over TestClient, an httpx.Client): states a live server rarely shows on cue.
    import threading

    from fastapi.testclient import TestClient

    from app.engine import QueueFullError
    from app.loader import load_pair
    from app.main import create_app
    from tests.test_api import make_settings, wait_ready

    gate = threading.Event()

    def slow_loader(settings):
        gate.wait(30)
        return load_pair(settings)

    with TestClient(create_app(make_settings(tiny_dirs, tmp_path), loader=slow_loader)) as c:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=c, max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.models.list()
        assert err.value.status_code == 503
        gate.set()
        wait_ready(c)

        def full(*args, **kw):
            raise QueueFullError("the engine queue is full (4 waiting)")

        monkeypatch.setattr(c.app.state.engine, "submit", full)
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="after", messages=SUN, max_tokens=2, stream=stream)
        monkeypatch.undo()
        assert client.chat.completions.create(model="after", messages=SUN, max_tokens=2).choices
