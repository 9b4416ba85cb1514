"""Transport failures are not results: `nemojax sdg run` against an unreachable or failing
OpenAI-compatible server exits 1 naming how many items failed, records nothing for them, and a
rerun once the server answers retries exactly those items; a 400 (the request itself is wrong)
is an outcome of its item and is not retried."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml

from nemojax.cli import main
from tests.fake_openai import FakeServer, chat_ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_pipeline(tmp: Path, run_dir: Path, base_url: str, n: int, max_in_flight: int = 4) -> Path:
    src = tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(n)))
    cfg = {"run_dir": str(run_dir), "seed": 0, "max_in_flight": max_in_flight, "progress": False,
           "clients": {"http": {"type": "openai", "base_url": base_url, "model": "m", "max_retries": 0,
                                "timeout_s": 5, "api_key_env": ""}},
           "stages": {"prompts": {"kind": "read", "path": str(src)},
                      "answers": {"kind": "respond", "max_tokens": 8},
                      "sft": {"kind": "export_sft"}}}
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def asked(server: FakeServer) -> list[str]:
    return [body["messages"][-1]["content"] for _, body, _ in server.requests]


def test_failed_items_make_the_stage_incomplete_and_a_rerun_retries_exactly_them(tmp_path, capsys):
    """Mutants killed: an HTTP failure after retries recorded as an `http_error` drop (the stage
    then completes, exit 0, and the items are never retried); a rerun that redoes finished
    items; a 400 treated as a transport failure (retried forever)."""
    phase = {"n": 1}

    def plan(path, body, attempt):
        text = body["messages"][-1]["content"]
        if text == "Question 5?":
            return 400, {}, {"error": {"message": "prompt too long"}}, 0
        if phase["n"] == 1 and text in ("Question 1?", "Question 4?"):
            return 503, {}, {"error": {"message": "overloaded"}}, 0
        return 200, {}, chat_ok("Answer to " + text), 0

    server = FakeServer(plan)
    try:
        run_dir = tmp_path / "run"
        path = write_pipeline(tmp_path, run_dir, server.url, 6)
        assert main(["sdg", "run", str(path), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "stage 'answers' is incomplete: 2 of 6 items failed for a transport reason (http_error: 2" in err
        assert "HTTP 503" in err and "rerun the same command to retry the 2 items left" in err
        assert not (run_dir / "answers.jsonl").exists() and not (run_dir / ".work" / "answers.done.json").exists()
        ledger = [json.loads(line) for line in (run_dir / ".work" / "answers.ledger.jsonl").read_text().splitlines()]
        prompts = (run_dir / "prompts.jsonl").read_text().splitlines()
        source = {r["id"]: r["source_id"] for r in map(json.loads, prompts)}
        assert sorted(source[e["in"]] for e in ledger[1:]) == ["q0", "q2", "q3", "q5"]

        phase["n"], before = 2, len(server.requests)
        assert main(["sdg", "run", str(path), "--no-progress"]) == 0
        assert sorted(asked(server)[before:]) == ["Question 1?", "Question 4?"]  # those items, and only those

        reference = write_pipeline(tmp_path, tmp_path / "ref", server.url, 6)
        assert main(["sdg", "run", str(reference), "--no-progress"]) == 0
        for name in ("answers.jsonl", "sft.jsonl"):
            assert (run_dir / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
        summary = json.loads((run_dir / "summary.json").read_text())["answers"]
        assert summary["kept"] == 5 and summary["dropped"] == {"bad_request": 1} and summary["resumed_items"] == 4
    finally:
        server.close()


def test_dead_endpoint_exits_nonzero_with_the_count_then_completes_once_the_server_is_up(tmp_path, capsys):
    """Connection refused for every request: the stage stops starting items after
    max(4, max_in_flight) failures in a row, exits 1 saying how many failed and how many were not attempted, and
    writes no output; with a server listening on that port the rerun answers all 8 items, each
    asked once. Mutant killed: refused connections recorded as dropped items (exit 0, stage done,
    the rerun prints "skipped": true and never asks again)."""
    port = free_port()
    run_dir = tmp_path / "run"
    path = write_pipeline(tmp_path, run_dir, f"http://127.0.0.1:{port}/v1", 8, max_in_flight=2)
    assert main(["sdg", "run", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    [report] = [json.loads(line) for line in err.splitlines() if line.startswith('{"stage": "answers"')]
    failed = report["failed"]  # 4, or 5 when the other worker's item was already in flight
    assert report == {"stage": "answers", "incomplete": True, "items_in": 8, "done": 0, "failed": failed,
                      "not_attempted": 8 - failed, "failed_by_reason": {"http_error": failed}} and failed in (4, 5)
    assert (f"stage 'answers' is incomplete: {failed} of 8 items failed for a transport reason "
            f"(http_error: {failed}; e.g. http://127.0.0.1:{port}/v1/chat/completions: gave up after 1 attempts; "
            f"last error: ConnectError") in err
    assert f"it stopped after 4 failures in a row, so {8 - failed} items were not attempted" in err
    assert not (run_dir / "answers.jsonl").exists()

    server = FakeServer(lambda p, body, a: (200, {}, chat_ok("ok " + body["messages"][-1]["content"]), 0), port=port)
    try:
        assert main(["sdg", "run", str(path), "--no-progress"]) == 0
        assert sorted(asked(server)) == sorted(f"Question {i}?" for i in range(8))
    finally:
        server.close()
    lines = capsys.readouterr().err.splitlines()
    assert json.loads(lines[0])["skipped"] is True  # prompts finished in the first run
    answers = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]
    assert [a["responses"][0]["messages"][-1]["content"] for a in answers] == [f"ok Question {i}?" for i in range(8)]
