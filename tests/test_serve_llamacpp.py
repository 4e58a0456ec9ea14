"""`afina serve --engine llama.cpp`: real llama.cpp on a real GGUF file of the tiny Llama, through real HTTP clients."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from afina.config import ServeConfig
from afina.serve.app import create_app, serve
from afina.serve.generation import encode_chat
from afina.serve.llamacpp_engine import load_gguf_served
from afina.serve.models import ServeError
from conftest import needs_llama_cpp
from serving import running_server

pytestmark = needs_llama_cpp
KEY = "engine-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = [f"Question {i}: what does code {i} mean?" + " Please answer." * (i % 3) for i in range(8)]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tokenizer, tmp_path_factory):
    """A run directory whose manifest records a verified F16 GGUF export of the tiny Llama.

    The weights are the fixture's scaled by 8: the fixture's own random weights answer every prompt with
    newlines, which would make equal answers prove little; scaled, each prompt gets its own varied text.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from afina.export.gguf_convert import convert_hf_folder
    from afina.rundir import RunDir

    root = tmp_path_factory.mktemp("engine")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" not in name:
                weight.mul_(8)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    run = RunDir(root / "runs" / "tiny")
    gguf = convert_hf_folder(root / "model", run.export / "gguf" / "tiny-f16.gguf", "f16")
    run.update_manifest(
        recipe={"model": {"name": str(root / "model"), "chat_template": None}},
        export={"gguf_f16": {"ok": True, "path": str(gguf)}, "gguf_q4_k_m": {"ok": False, "failed": "KL too high"}},
    )
    return run.root


@pytest.fixture(scope="module")
def served(run_dir):
    return load_gguf_served(str(run_dir))


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    settings = ServeConfig(api_key=KEY, max_tokens=64, log_dir=str(log_dir), threads=1, max_batch=4)
    with running_server(create_app(served, settings)) as base:
        yield base, log_dir


def chat(base, question, **options):
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, **options}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def direct_greedy(path, ids, n):
    """llama-cpp-python itself on the same file and the same prompt tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    tokens = []
    for token in llm.generate(ids, temp=0.0, reset=True):
        tokens.append(token)
        if len(tokens) == n:
            break
    llm.close()
    return tokens


def test_answers_as_llama_cpp_python_does_on_the_same_file_and_tokens(server, served):
    base, _ = server
    for question in QUESTIONS[:2]:
        ids = encode_chat(served.tokenizer, [{"role": "user", "content": question}])
        expected = direct_greedy(served.gguf, ids, 12)
        body = chat(base, question)
        assert body["choices"][0]["message"]["content"] == served.tokenizer.decode(expected, skip_special_tokens=True)
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
        assert body["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{base}/health").json()["engine"] == "llama.cpp"


def test_streaming_chunks_join_to_the_answer(server):
    from openai import OpenAI

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    pieces = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == whole.choices[0].message.content
    completion = client.completions.create(model="tiny", prompt="The filter", max_tokens=6)
    streamed = client.completions.create(model="tiny", prompt="The filter", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_a_stop_string_cuts_the_answer(server):
    base, _ = server
    full = chat(base, QUESTIONS[3])["choices"][0]["message"]["content"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = chat(base, QUESTIONS[3], stop=[stop])["choices"][0]
    assert cut["message"]["content"] == full[: full.find(stop)]
    assert cut["finish_reason"] == "stop"


def test_concurrent_requests_decoded_together_answer_as_each_alone(server):
    base, _ = server
    alone = [chat(base, q)["choices"][0]["message"]["content"] for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # 8 clients, 4 sequence slots: batches and a queue
        together = list(pool.map(lambda q: chat(base, q)["choices"][0]["message"]["content"], QUESTIONS))
    assert together == alone
    assert len(set(alone)) > 1  # the prompts get different answers: equality says something


def test_sampling_logprobs_and_json_output_run_in_llama_cpp(server, tokenizer):
    base, _ = server
    first, again = (chat(base, QUESTIONS[0], temperature=1.0, seed=7, n=2) for _ in range(2))
    assert [c["message"]["content"] for c in first["choices"]] == [c["message"]["content"] for c in again["choices"]]
    scored = chat(base, QUESTIONS[0], logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]["content"]
    assert len(scored) == 12
    for entry in scored:  # greedy: the chosen token is the most likely one
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
    text = chat(base, QUESTIONS[1], response_format={"type": "json_object"}, max_tokens=24)["choices"][0]
    from afina.serve.grammar import ANY_OBJECT, json_grammar
    from serving import grammar_accepts

    assert grammar_accepts(tokenizer, json_grammar(ANY_OBJECT), text["message"]["content"])


def test_request_log_and_feedback(server):
    base, log_dir = server
    answer = chat(base, "Remember this one.")
    feedback = httpx.post(f"{base}/v1/feedback", json={"id": answer["id"], "rating": 1}, headers=AUTH)
    assert feedback.status_code == 200
    logged = [json.loads(line) for line in (log_dir / "requests.jsonl").read_text().splitlines()]
    assert answer["id"] in {row["id"] for row in logged}
    assert httpx.post(f"{base}/v1/chat/completions", json={"messages": []}).status_code == 401


def test_a_client_that_goes_away_stops_its_generation(server):
    import time

    base, log_dir = server
    body = {"messages": [{"role": "user", "content": "A long answer, please."}], "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # the first piece of text: hang up
    for _ in range(100):
        logged = [json.loads(line) for line in (log_dir / "requests.jsonl").read_text().splitlines()]
        aborted = [row for row in logged if row.get("aborted")]
        if aborted:
            break
        time.sleep(0.1)
    assert aborted and aborted[-1]["usage"]["completion_tokens"] < 60
    assert chat(base, QUESTIONS[0])["choices"][0]["finish_reason"] == "length"  # the engine serves on


def test_what_the_engine_cannot_do_is_refused_naming_it(run_dir, tmp_path, monkeypatch):
    with pytest.raises(ServeError, match=r"--adapter: the llama\.cpp engine serves one GGUF file"):
        serve(str(run_dir), ServeConfig(engine="llama.cpp", adapters={"other": str(run_dir)}))
    with pytest.raises(ServeError, match=r"--watch: the llama\.cpp engine cannot switch adapters"):
        serve(str(run_dir), ServeConfig(engine="llama.cpp", watch=str(tmp_path / "serving.json")))
    with pytest.raises(ServeError, match="add --engine llama.cpp"):
        serve(str(run_dir), ServeConfig(gguf_type="q8_0"))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(ServeError, match="afina setup llama-cpp"):
        load_gguf_served(str(run_dir))


def test_a_missing_gguf_names_the_command_that_makes_one(run_dir, tmp_path):
    with pytest.raises(ServeError, match=r"its q4_k_m export failed its check: KL too high \(verified here: f16\)"):
        load_gguf_served(str(run_dir), "q4_k_m")
    with pytest.raises(
        ServeError, match=r"no verified q8_0 export.*afina export RECIPE\.yaml export\.formats=\[gguf\]"
    ):
        load_gguf_served(str(run_dir), "q8_0")
    bare = tmp_path / "runs" / "untrained"
    bare.mkdir(parents=True)
    (bare / "manifest.json").write_text(json.dumps({"recipe": {"model": {"name": "x"}}}))
    with pytest.raises(ServeError, match=r"needs a GGUF export whose verification passed.*afina export"):
        load_gguf_served(str(bare))
    with pytest.raises(ServeError, match="no such GGUF file"):
        load_gguf_served(str(tmp_path / "missing.gguf"))
