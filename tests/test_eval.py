"""`nemojax eval`: every suite scores scripted answers exactly; the CLI on a checkpoint reports
the tasks accuracy of the engine's own greedy answers and the same held-out loss as a direct
forward pass; bad inputs are one-line errors naming what to fix."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from nemojax.align.tasks import Task, verify_many
from nemojax.cli import main
from nemojax.evaluation.suites import (EvalDataError, answers_suite, ifeval_suite, read_jsonl, rewardbench_suite,
                                       tasks_suite)
from nemojax.sdg.llm import ScriptedLLM
from nemojax.sdg.reward import ScriptedReward
from tests.sdg_helpers import save_random_lm

TASKS = [Task("arithmetic", 1, "What is 2 + 3?", "2 + 3 = 5. The answer is 5.", {"kind": "number", "value": 5}),
         Task("strings", 2, 'Repeat the word "abcd".', "abcd", {"kind": "text", "value": "abcd"}),
         Task("format", 1, "What is 1 + 1? Wrap your entire response with double quotation marks.",
              '"1 + 1 = 2. The answer is 2."',
              {"kind": "number", "value": 2, "instruction_id": "startend:quotation", "instruction_kwargs": {},
               "base_family": "arithmetic"})]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reply(req, i):
    q = req.messages[-1]["content"]
    return {"What is 2 + 3?": "The answer is 5.", 'Repeat the word "abcd".': "abdc"}.get(q, "The answer is 2.")


def test_generation_suites_score_scripted_answers():
    llm = ScriptedLLM(reply)
    r = asyncio.run(tasks_suite(llm, TASKS))
    assert r.metrics["by_family"] == {"arithmetic": 1.0, "format": 0.0, "strings": 0.0}
    assert r.score == pytest.approx(1 / 3)
    assert r.metrics["ifeval"]["prompt_level_strict"] == 0.0  # no quotes around the answer
    gsm = [{"question": "What is 2 + 3?", "answer": "two and three #### 5"}, {"question": "Other?", "answer": 3}]
    a = asyncio.run(answers_suite(llm, gsm))
    assert [row["correct"] for row in a.rows] == [True, False] and a.score == 0.5
    ife = [{"prompt": "What is 2 + 3?", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
           {"prompt": "Other?", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]}]
    i = asyncio.run(ifeval_suite(llm, ife))
    assert i.metrics["prompt_level_strict"] == 0.5 and i.score == 0.5


def test_rewardbench_pairwise_accuracy_per_subset():
    reward = ScriptedReward(lambda m: {"helpfulness": float(len(m[-1]["content"]))}, weights={"helpfulness": 1.0})
    rows = [{"prompt": "p", "chosen": "long answer", "rejected": "short", "subset": "chat"},
            {"prompt": "p", "chosen": "a", "rejected": "bbb", "subset": "chat"},
            {"prompt": [{"role": "user", "content": "p"}], "chosen": "xyz", "rejected": "x", "subset": "hard"}]
    r = asyncio.run(rewardbench_suite(reward, rows))
    assert r.metrics["by_subset"] == {"chat": 0.5, "hard": 1.0}
    assert r.score == 0.75 and r.metrics["accuracy"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_lm(tmp_path_factory.mktemp("eval") / "lm", max_seq_len=128)


@pytest.mark.heavy
def test_eval_cli_on_a_checkpoint(ckpt, tmp_path, capsys):
    import jax.numpy as jnp

    from nemojax.checkpoint import load_model
    from nemojax.data.chat import encode_chat
    from nemojax.data.tokenizer import load_tokenizer
    from nemojax.train.losses import token_log_probs

    tasks = write(tmp_path / "tasks.jsonl", [t.to_json() for t in TASKS])
    sft = write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": t.prompt},
                                                       {"role": "assistant", "content": t.answer}]} for t in TASKS])
    out = tmp_path / "report.json"
    rc = main(["eval", "--checkpoint", str(ckpt), "--suite", f"tasks={tasks}", "--suite", f"loss={sft}",
               "--max-tokens", "8", "--max-len", "128", "--batch-slots", "4", "--output", str(out), "--rows"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert "tasks" in capsys.readouterr().err  # the table
    rows = report["rows"]["tasks"]
    assert [r["correct"] for r in rows] == verify_many(TASKS, [r["response"] for r in rows])
    assert report["score"] == report["suites"]["tasks"]["score"]
    # the loss suite equals a direct forward pass over the assistant tokens
    model, tok = load_model(ckpt), load_tokenizer("builtin")
    nll = count = 0.0
    for t in TASKS:
        enc = encode_chat(tok, [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.answer}])
        ids = jnp.asarray(np.asarray(enc.ids)[None])
        lp = np.asarray(token_log_probs(model(ids[:, :-1]), ids[:, 1:]))[0]
        m = np.asarray(enc.loss_mask)[1:].astype(bool)
        nll, count = nll - lp[m].sum(), count + m.sum()
    assert report["suites"]["loss"]["score"] == pytest.approx(nll / count, rel=1e-4)
    assert report["suites"]["loss"]["metrics"]["tokens"] == count


def test_eval_cli_errors_name_what_to_fix(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": 1}\nnot json\n')
    cases = [(["--suite", "poetry=x.jsonl", "--checkpoint", str(ckpt)], "unknown suite"),
             (["--suite", "answers=missing.jsonl", "--checkpoint", str(ckpt)], "not found"),
             (["--suite", f"answers={bad}", "--checkpoint", str(ckpt)], f"{bad}:2"),
             (["--suite", f"answers={bad}", "--endpoint", "http://localhost:1/v1"], "--model"),
             (["--suite", f"answers={bad}"], "exactly one model"),
             (["--suite", "answers"], "NAME=FILE"),
             (["--suite", f"answers={bad}", "--checkpoint", str(tmp_path / "nope")], "nope")]
    for args, message in cases:
        assert main(["eval", *args]) == 2, args
        assert message in capsys.readouterr().err, args


def test_read_jsonl_rejects_non_objects(tmp_path):
    p = write(tmp_path / "x.jsonl", [[1, 2]])
    with pytest.raises(EvalDataError, match=r"x.jsonl:1: expected a JSON object"):
        read_jsonl(p)


def test_failed_requests_are_counted_not_scored_as_answers():
    from nemojax.sdg.llm import LLMError

    def flaky(req, i):
        if req.messages[-1]["content"].startswith("What is 2"):
            raise LLMError("HTTP 503: overloaded", "http_error")
        return reply(req, i)

    r = asyncio.run(tasks_suite(ScriptedLLM(flaky), TASKS))
    assert r.failed == 1 and r.metrics["failed"] == 1 and "overloaded" in r.errors[0]
    assert [row["response"] is None for row in r.rows] == [True, False, False]
    assert r.score == 0.0  # the failed request is not a right answer, the others are scored as before


class _Server:
    """A local HTTP server: GET /v1/models answers 200, POST (chat completions) answers 400."""

    def __enter__(self) -> str:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b'{"data": []}')

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(400)
                self.end_headers()
                self.wfile.write(b'{"error": "model not loaded"}')

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_eval_cli_exits_nonzero_on_unreachable_endpoint_and_failed_requests(tmp_path, capsys):
    import socket

    tasks = write(tmp_path / "tasks.jsonl", [t.to_json() for t in TASKS])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rc = main(["eval", "--endpoint", f"http://127.0.0.1:{closed}/v1", "--model", "m", "--suite", f"tasks={tasks}"])
    assert rc == 2 and "cannot be reached" in capsys.readouterr().err
    out = tmp_path / "report.json"
    with _Server() as url:
        rc = main(["eval", "--endpoint", url, "--model", "m", "--suite", f"tasks={tasks}", "--output", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "3 request(s) failed" in err and "INCOMPLETE" in err
    report = json.loads(out.read_text())
    assert report["complete"] is False and report["failed_requests"] == 3
    assert report["suites"]["tasks"]["metrics"]["failed"] == 3 and "model not loaded" in report["errors"][0]
