"""Mutation testing of the modules that define correctness, one area at a time (docs/TESTING.md).

    python scripts/mutation.py losses             # mutate the area's modules, run only its tests
    python scripts/mutation.py --list             # the areas: modules, tests, tool
    python scripts/mutation.py losses --confirm-only   # re-check the last run's survivors (new tests)
    python scripts/mutation.py --table            # the docs/TESTING.md table from docs/mutation/*.json
    python scripts/mutation.py tasks --partial    # report an interrupted run: what it checked, its rate
    python scripts/mutation.py --survivors        # every survivor with its reason (docs/mutation/reasons.json)

Each area mutates its modules and runs only that area's test files, in the order listed (cheap
hand-value tests first: with `-x` most mutants die there). The work happens in a copy of the
working tree (.mutation/<area>/, git-ignored), never in it. Results go to docs/mutation/<area>.json:
per module the mutant counts by status, the kill ratio, and every surviving mutant with its diff.

Tools (the `mutation` extra pins both):

* mutmut: every mutant of a module is compiled in next to the original behind a trampoline and
  selected by an environment variable, so one copy serves all mutants. Each mutant runs in a
  process forked from a fork server that has imported nothing but pytest (`forkserver_warmup =
  "none"`): JAX is imported fresh per mutant, after the fork (JAX's threads do not survive a fork,
  and an in-memory jit cache inherited from a clean run would replay unmutated programs). mutmut
  runs, per mutant, only the area's tests that called the mutated function in its stats run; a
  test that reused a program compiled by an earlier test never calls it there. So every mutant
  mutmut does not kill (survived, no tests, suspicious) is *confirmed*: applied to the copy's
  source and checked by the area's whole test command in a fresh process. The reported
  survivors are those that pass the whole command.
* cosmic-ray, for a module that runs as a script in a child process (`sandbox_child.py`, started
  as `python -I sandbox_child.py`): mutmut's trampolines dispatch by module name, which a script
  does not have; cosmic-ray rewrites the file on disk and runs the test command per mutant.

Kill ratio = (killed + timeout) / all mutants checked; "no tests" and "suspicious" mutants that
the confirmation run does not kill count as survivors. An area stopped before the end (too slow
for the time at hand) is reported with --partial: the mutants checked so far, unconfirmed (so
its kill ratio is a lower bound over those), the rate and the estimated time for the rest.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".mutation"
REPORTS = REPO / "docs" / "mutation"
PYTHON = sys.executable


@dataclass(frozen=True)
class Area:
    """Modules mutated together and the test files that guard them (cheap ones first)."""

    modules: tuple[str, ...]
    tests: tuple[str, ...]
    what: str
    # fnmatch globs over mutmut's mutant names: only these parts of the modules (default: all)
    functions: tuple[str, ...] = ()
    tool: str = "mutmut"
    # another area whose work copy (mutants, verdicts) this one shares: two selections of one module
    shares: str = ""


def work_dir(area: str) -> Path:
    """.mutation/<area>, or the work copy of the area it shares."""
    return WORK / (AREAS[area].shares or area)


_SERVE_APP, _SERVE_PROTOCOL = "nemojax.serve.app.", "nemojax.serve.protocol."
_SERVE_TESTS = ("tests/test_serve_protocol.py", "tests/test_serve_admission.py", "tests/test_serve_waiting.py",
                "tests/test_serve_guard.py",
                "tests/test_serve_limits.py", "tests/test_serve.py", "tests/test_serve_hardening.py")
AREAS: dict[str, Area] = {
    "losses": Area(("nemojax/train/losses.py",), ("tests/test_losses.py", "tests/test_stage_objectives.py"),
                   "every training loss, as pure functions"),
    "tasks": Area(("nemojax/train/tasks.py",),
                  ("tests/test_stage_objectives.py", "tests/test_stage_task.py", "tests/test_reference_cache.py",
                   "tests/test_reward_reading.py"),
                  "each stage's objective, batch fields and trainable set"),
    "step": Area(("nemojax/train/step.py",), ("tests/test_train_step.py", "tests/test_optim.py",
                                              "tests/test_stage_objectives.py",
                                              "tests/test_parallel_equivalence.py"),
                 "the train step: gradient accumulation, division, update"),
    "reward": Area(("nemojax/model/reward.py", "nemojax/inference/reward.py"),
                   ("tests/test_reward_model.py", "tests/test_reward_reading.py", "tests/test_reward_cli.py"),
                   "the reward model and RewardScorer"),
    "sampling": Area(("nemojax/inference/sampling.py",), ("tests/test_sampling_params.py", "tests/test_sampling.py",
                                                      "tests/test_engine.py"),
                     "sampling filters and the seeded sampler"),
    "prefix_cache": Area(("nemojax/inference/prefix_cache.py",), ("tests/test_prefix_cache.py", "tests/test_engine.py"),
                         "the prefix cache's block index"),
    "serve": Area(("nemojax/serve/app.py", "nemojax/serve/protocol.py"), _SERVE_TESTS,
                  "the server's auth and limits: API key, body size, queue, timeouts, disconnects, request checks",
                  functions=tuple(_SERVE_APP + f for f in (
                      "xǁTicketǁ*", "xǁServerǁretry_after__*", "xǁServerǁ_full__*", "xǁServerǁrefuse_early__*",
                      "xǁServerǁadmit__*", "xǁServerǁadmit_generation__*", "xǁServerǁqueue_depth__*",
                      "xǁServerǁdeadline__*", "xǁServerǁtimeout_error__*", "xǁServerǁevents__*",
                      "xǁServerǁuntil_done__*", "x__disconnected__*", "x__wait_for_disconnect__*", "xǁ_Guardǁ*",
                      "x__too_large__*", "x__limited__*")) + tuple(_SERVE_PROTOCOL + f for f in (
                      "xǁAPIErrorǁ*", "x_bad__*", "x__reject_constant__*", "x__child__*", "x__check_tree__*",
                      "x_parse_json_body__*", "x_check_fields__*", "x_longest_piece__*", "xǁParserǁ__init____*",
                      "xǁParserǁcheck_model__*", "xǁParserǁcheck_text__*", "xǁParserǁcheck_prompt_ids__*",
                      "xǁParserǁcheck_room__*"))),
    # the rest of protocol.py: what a valid request means (sampling fields, messages, prompts)
    "serve_requests": Area(("nemojax/serve/app.py", "nemojax/serve/protocol.py"), _SERVE_TESTS,
                           "the server's request parsing: sampling fields, messages, prompts, chat template",
                           functions=tuple(_SERVE_PROTOCOL + f for f in (
                               "x__is_int__*", "x__is_num__*", "x__opt__*", "x_sampling_params__*",
                               "x_stream_flags__*", "x_normalize_messages__*", "xǁParserǁ_top_logprobs__*",
                               "xǁParserǁcompletion__*", "xǁParserǁ_prompts__*", "xǁParserǁchat_prompt__*",
                               "xǁParserǁchat__*")),
                           shares="serve"),
    "sandbox": Area(("nemojax/sdg/sandbox.py",), ("tests/test_sdg_sandbox_cgroups.py", "tests/test_sdg_sandbox.py"),
                    "the SDG code sandbox's runner"),
    "sandbox_child": Area(("nemojax/sdg/sandbox_child.py",), ("tests/test_sdg_sandbox.py",),
                          "the SDG code sandbox's launcher (namespaces, cgroups, limits)", tool="cosmic-ray"),
    "judges": Area(("nemojax/sdg/judge_replies.py", "nemojax/sdg/stages/judges.py"),
                   ("tests/test_sdg_judges.py", "tests/test_sdg_verify.py"),
                   "SDG judges: reward filter, LLM-as-judge, preference pairs"),
    "instructions": Area(("nemojax/sdg/instructions/checkers.py", "nemojax/sdg/instructions/text.py"),
                         ("tests/test_sdg_instructions.py", "tests/test_sdg_instructions_reference.py"),
                         "IFEval instruction checkers"),
}

# mutmut's exit codes (mutmut.stats.status_by_exit_code), folded into the statuses reported here
_KILLED, _TIMEOUT = {1, 3}, {36, 24, -24, 152, 255, -9}
_SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}
PYTEST_FLAGS = ("-x", "-q", "-n", "0", "-p", "no:cacheprovider")  # -n 0: no xdist workers per mutant

# cosmic-ray's operators, narrowed to one plausible slip per site (as mutmut's are): replacing an
# arithmetic operator by a shift, a bitwise or a modulo only makes a TypeError or nonsense that
# any test kills, and `is` for `==` on numbers is an identity test nobody writes by mistake.
COSMIC_RAY_EXCLUDE = (
    r"core/ReplaceBinaryOperator_(Add|Sub|Mul|Div|FloorDiv|Mod|Pow)_(FloorDiv|Mod|Pow|RShift|LShift|BitOr|BitAnd|BitXor)",
    r"core/ReplaceBinaryOperator_(LShift|RShift)_.*",
    r"core/ReplaceBinaryOperator_(BitOr|BitAnd|BitXor)_(Add|Sub|Mul|Div|FloorDiv|Mod|Pow|RShift|LShift)",
    r"core/ReplaceBinaryOperator_(BitOr_BitXor|BitXor_BitOr)",
    r"core/ReplaceComparisonOperator_(Eq|NotEq|Lt|LtE|Gt|GtE|In|NotIn)_(Is|IsNot)",
    r"core/ReplaceUnaryOperator_.*_(Invert|Not)",
    r"core/VariableReplacer", r"core/VariableInserter", r"core/RemoveDecorator",
)


# --------------------------------------------------------------------------- the work copy


def make_work_copy(area: str, a: Area, mode: str = "fresh", debug: bool = False) -> Path:
    """.mutation/<area>/: the working tree's files as git sees them (tracked and new, not ignored).

    mode "fresh": a new copy; "tests": only tests/ copied again (--confirm-only, --resume: today's
    tests against the mutants already made).
    """
    work = work_dir(area)
    if mode == "fresh" and work.exists():
        shutil.rmtree(work)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if mode == "tests" and not f.startswith("tests/"):
            continue
        src, dst = REPO / f, work / f
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    if a.tool == "mutmut" and mode == "fresh":
        (work / "pyproject.toml").write_text(_area_pyproject(a, debug))
    if mode == "fresh":  # for --partial: the rate of an interrupted run
        (work / "started.json").write_text(json.dumps({"time": time.time(), "commit": git_commit()}))
        for module in a.modules:  # what `confirm` restores, whatever an interrupted confirmation left
            pristine = work / "pristine" / module
            pristine.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / module, pristine)
    return work


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # strings (TOML basic strings are JSON strings here) and numbers


def _area_pyproject(a: Area, debug: bool = False) -> str:
    """The repo's pyproject with its [tool.mutmut] settings plus the area's modules and tests."""
    text = (REPO / "pyproject.toml").read_text()
    settings = dict(tomllib.loads(text)["tool"]["mutmut"])
    settings.update(only_mutate=list(a.modules), pytest_add_cli_args_test_selection=list(a.tests), debug=debug)
    body = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    return body.rstrip() + "\n\n[tool.mutmut]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())


def _env(work: Path, python_path: list[Path], order: tuple[str, ...]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MUTANT_UNDER_TEST", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in python_path)
    env["NEMOJAX_TEST_CACHE"] = str(REPO / ".jax_cache")  # compiled programs are keyed by their HLO
    env["NEMOJAX_MUTATION_TEST_ORDER"] = ",".join(order)
    env["PATH"] = str(Path(PYTHON).parent) + os.pathsep + env.get("PATH", "")
    return env


def test_command(a: Area) -> list[str]:
    return [PYTHON, "-m", "pytest", *PYTEST_FLAGS, *a.tests]


# --------------------------------------------------------------------------- mutmut


def _status(code: int | None) -> str:
    if code is None:
        return "not checked"
    if code in _KILLED:
        return "killed"
    if code in _TIMEOUT:
        return "timeout"
    if code == 37:
        return "killed"  # caught by the type check (none is configured)
    return _SURVIVED.get(code, "suspicious")


def _selected(a: Area, name: str) -> bool:
    return not a.functions or any(fnmatch.fnmatch(name, g) for g in a.functions)


def mutmut_results(work: Path, a: Area) -> dict[str, dict[str, str]]:
    """{module: {mutant name: status}} from mutmut's per-file .meta records (the area's functions only)."""
    out = {}
    for module in a.modules:
        meta = json.loads((work / "mutants" / (module + ".meta")).read_text())
        out[module] = {k: _status(v) for k, v in meta["exit_code_by_key"].items() if _selected(a, k)}
    return out


def _unchecked(work: Path, a: Area) -> list[str]:
    """The area's mutants an interrupted run has no verdict for yet."""
    return [n for by_name in mutmut_results(work, a).values() for n, s in by_name.items() if s == "not checked"]


def run_mutmut(work: Path, a: Area, jobs: int, log, resume: bool = False) -> None:
    # on PYTHONPATH for the tests' own subprocesses; created first: a sys.path entry that does not
    # exist when Python starts is cached as absent for the life of the process (and its forks)
    (work / "mutants").mkdir(exist_ok=True)
    env = _env(work, [work / "mutants", REPO / "scripts"], a.tests)
    # mutmut re-runs every mutant named on its command line, finished or not: a resumed area
    # with selected functions names only the mutants still without a verdict
    names = list(a.functions)
    if resume and a.functions:
        names = _unchecked(work, a)
        if not names:
            return
    cmd = [PYTHON, "-m", "mutmut", "run", "--max-children", str(jobs), *names]
    rc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"mutmut run failed (exit {rc}); see {log.name}")


def _confirm_each(area: str, names: list[str], statuses: dict[str, str], confirmed: dict[str, str],
                  check) -> list[str]:
    """Confirm `names` one by one into `statuses` / `confirmed`; stopped (SIGTERM, Ctrl-C), return
    the names not re-checked, so that the report keeps every verdict reached so far."""
    for i, name in enumerate(names):
        print(f"[{area}] confirming {i + 1}/{len(names)} {name}", flush=True)
        try:
            statuses[name] = confirmed[name] = check(name)
        except (KeyboardInterrupt, SystemExit):
            print(f"[{area}] stopped: {len(names) - i} survivors not re-checked", flush=True)
            return names[i:]
    return []


def confirm(work: Path, a: Area, module: str, name: str, timeout: float, log, diff: str = "") -> str:
    """Apply one mutant to the copy's source and run the area's whole test command in a fresh process.

    A mutmut mutant is applied by name; a cosmic-ray one (`diff`, from its report) with `patch`.
    """
    path = work / module
    saved = work / "pristine" / module
    original = saved.read_text() if saved.exists() else path.read_text()
    path.write_text(original)
    try:
        if diff:
            subprocess.run(["patch", "-p1", "--forward", "--quiet"], input=diff, text=True, cwd=work, check=True,
                           capture_output=True)
        else:
            path.write_text(apply_mutmut_mutant(work, module, name, original))
        if path.read_text() == original:
            raise RuntimeError(f"applying {name} changed nothing in {module}")
        log.write(f"\n== confirm {name}\n")
        log.flush()
        try:
            rc = subprocess.run(test_command(a), cwd=work, env=_env(work, [work], a.tests), stdout=log,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return "timeout"
        if rc in (2, 4):
            raise RuntimeError(f"the test command could not run for {name} (pytest exit {rc}); see {log.name}")
        return "killed" if rc != 0 else "survived"
    finally:
        path.write_text(original)


def _function(tree: ast.Module, cls: str | None, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    scope = tree.body
    if cls is not None:
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
        if len(classes) != 1:
            raise RuntimeError(f"class {cls} found {len(classes)} times")
        scope = classes[0].body
    found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    if len(found) != 1:
        raise RuntimeError(f"{cls + '.' if cls else ''}{name} found {len(found)} times")
    return found[0]


def _mutated_function(name: str) -> tuple[str | None, str]:
    """(class or None, function) that mutmut mutant `name` mutates: `...xǁClassǁmethod__mutmut_N`
    or `...x_function__mutmut_N`."""
    key = name.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
    return (key.split("ǁ")[1], key.split("ǁ")[2]) if key.startswith("xǁ") else (None, key[2:])


def apply_mutmut_mutant(work: Path, module: str, name: str, original: str) -> str:
    """`original` (the module's source) with mutant `name` in place of the function it mutates.

    Not `mutmut apply`: mutmut 3.8.1 puts a method's mutant into the first function of that name
    in the module, whatever its class, so a mutant of `_Guard.__call__` replaced
    `_ReservedStream.__call__` and the tests it broke counted it killed. Here the mutant's text is
    taken from mutmut's mutated module (its `xǁClassǁmethod__mutmut_N` or `x_function__mutmut_N`)
    and put over that class's method (or that module-level function), decorators kept."""
    mangled = name.rsplit(".", 1)[1]
    cls, fn = _mutated_function(name)
    mutated = (work / "mutants" / module).read_text()
    src = _function(ast.parse(mutated), cls, mangled)
    lines = mutated.splitlines(keepends=True)[src.lineno - 1:src.end_lineno]
    lines[0] = lines[0].replace(f"def {mangled}(", f"def {fn}(", 1)
    target = _function(ast.parse(original), cls, fn)
    out = original.splitlines(keepends=True)
    return "".join(out[:target.lineno - 1] + lines + out[target.end_lineno:])


def mutant_diff(work: Path, name: str) -> str:
    out = subprocess.run([PYTHON, "-m", "mutmut", "show", name], cwd=work, capture_output=True, text=True,
                         env=_env(work, [work], ())).stdout
    return "\n".join(line for line in out.splitlines()[1:] if line.strip())


# --------------------------------------------------------------------------- cosmic-ray


def run_cosmic_ray(work: Path, a: Area, timeout: float, log) -> dict[str, dict[str, str]]:
    """{module: {mutant id: status}}; diffs are kept in the session database."""
    (module,) = a.modules
    cfg = work / "cosmic-ray.toml"
    cfg.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(module)}\n"
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(' '.join(['python', '-m', 'pytest', *PYTEST_FLAGS, *a.tests]))}\n"
        "[cosmic-ray.distributor]\nname = \"local\"\n"
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = {_toml_value(list(COSMIC_RAY_EXCLUDE))}\n")
    db = work / "session.sqlite"
    env = _env(work, [work], a.tests)
    for cmd in (["cosmic-ray", "init", cfg.name, db.name, "--force"], ["cr-filter-operators", db.name, cfg.name],
                ["cr-filter-pragma", db.name], ["cosmic-ray", "baseline", cfg.name],
                ["cosmic-ray", "exec", cfg.name, db.name]):
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log.name}")
    return {module: {job: status for job, status, _ in cosmic_ray_rows(db)}}


def cosmic_ray_rows(db: Path) -> list[tuple[str, str, str]]:
    """(mutant id, status, diff) of every mutant cosmic-ray ran (filtered ones are 'skipped')."""
    rows = sqlite3.connect(db).execute(
        "SELECT s.job_id, s.operator_name, s.occurrence, s.start_pos_row, r.worker_outcome, r.test_outcome, "
        "r.output, r.diff FROM mutation_specs s JOIN work_results r ON r.job_id = s.job_id").fetchall()
    out = []
    for job, op, occ, row, worker, test, output, diff in rows:
        worker, test = (worker or "").lower(), (test or "").lower()  # cosmic-ray 8 stores enum names: KILLED
        if worker == "skipped":
            continue
        if test == "killed":
            status = "timeout" if (output or "").strip() == "timeout" else "killed"
        elif test == "survived":
            status = "survived"
        else:
            status = "suspicious"  # incompetent: the mutant does not even run
        out.append((f"{op}#{occ}@L{row}:{job[:8]}", status, diff or ""))
    return out


# --------------------------------------------------------------------------- the report


def counts(statuses: dict[str, str]) -> dict[str, float]:
    c = {s: sum(v == s for v in statuses.values())
         for s in ("killed", "timeout", "survived", "suspicious", "not checked")}
    checked = len(statuses) - c["not checked"]
    c["mutants"] = len(statuses)
    c["kill_ratio"] = round((c["killed"] + c["timeout"]) / checked, 4) if checked else None
    return c


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def tool_version(tool: str) -> str:
    from importlib.metadata import version

    return f"{tool} {version(tool)}"


def _ambiguous(work: Path, module: str, names: list[str]) -> list[str]:
    """The mutants among `names` whose function name is defined more than once in the module's
    classes or top level: the ones `mutmut apply` (used for confirmation before the fix above) may
    have put into another class's function."""
    saved = work / "pristine" / module
    tree = ast.parse((saved if saved.exists() else work / module).read_text())
    defs = [n.name for top in tree.body for n in ([top] + (top.body if isinstance(top, ast.ClassDef) else []))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return [n for n in names if defs.count(_mutated_function(n)[1]) > 1]


def run_area(area: str, jobs: int, confirm_only: bool, timeout: float, debug: bool = False,
             resume: bool = False, reconfirm_ambiguous: bool = False) -> dict:
    a = AREAS[area]
    report_path = REPORTS / f"{area}.json"
    previous = json.loads(report_path.read_text()) if confirm_only else None
    if confirm_only and (previous is None or not work_dir(area).exists()):
        raise SystemExit(f"--confirm-only needs a previous run of {area} (.mutation/{area} and {report_path})")
    started, commit = time.monotonic(), git_commit()  # the commit whose files are copied
    if resume and not (work_dir(area) / "mutants").exists():
        raise SystemExit(f"--resume needs an interrupted run of {area} (.mutation/{area}/mutants)")
    # --resume and --confirm-only keep the mutants and copy today's tests (only tests may change
    # between the runs: the report's commit is today's)
    work = make_work_copy(area, a, "tests" if resume or confirm_only else "fresh", debug)
    log = open(work / "mutation.log", "a")
    print(f"[{area}] work copy {work}, log {log.name}", flush=True)
    diffs: dict[str, str] = {}
    not_rechecked: list[str] = []
    reconfirmed: list[str] = list(previous.get("reconfirmed_after_apply_fix", [])) if previous else []
    recheck_only: set[str] = set()
    if a.tool == "cosmic-ray":
        if confirm_only:  # the session database holds cosmic-ray's verdicts; today's tests re-check survivors
            (module,) = a.modules
            rows = cosmic_ray_rows(work / "session.sqlite")
            confirmed = dict(previous.get("confirmed", {}))
            statuses = {module: {job: confirmed.get(job, status) for job, status, _ in rows}}
            diffs = {job: diff for job, _, diff in rows}
            open_names = [n for n, s in statuses[module].items() if s == "survived"]
            not_rechecked += _confirm_each(area, open_names, statuses[module], confirmed,
                                           lambda n: confirm(work, a, module, n, timeout, log, diffs[n]))
        else:
            statuses = run_cosmic_ray(work, a, timeout, log)
            diffs = {job: diff for job, _, diff in cosmic_ray_rows(work / "session.sqlite")}
            confirmed = {}
    else:
        if confirm_only:
            statuses = {m: dict(v["statuses"]) for m, v in previous["modules"].items()}
            confirmed = dict(previous.get("confirmed", {}))
            if reconfirm_ambiguous:  # confirmed kills that mutmut's apply may have placed wrongly
                for module, by_name in statuses.items():
                    kills = [n for n in confirmed if n in by_name and confirmed[n] in ("killed", "timeout")]
                    for n in _ambiguous(work, module, kills):
                        by_name[n] = "survived"
                        del confirmed[n]
                        recheck_only.add(n)
                reconfirmed += sorted(recheck_only)
        else:
            run_mutmut(work, a, jobs, log, resume)
            statuses = mutmut_results(work, a)
            confirmed = {}
        for module, by_name in statuses.items():
            open_names = [n for n, s in by_name.items() if s in ("survived", "no tests", "suspicious")
                          and (not reconfirm_ambiguous or n in recheck_only)]  # the others: confirmed already
            if not_rechecked:  # stopped during an earlier module: leave the rest as mutmut left them
                not_rechecked += open_names
                continue
            not_rechecked += _confirm_each(area, open_names, by_name, confirmed,
                                           lambda n: confirm(work, a, module, n, timeout, log))
        for module, by_name in statuses.items():
            for name, s in by_name.items():
                if s == "survived":
                    diffs[name] = mutant_diff(work, name)
    wall = time.monotonic() - started
    report = {
        "area": area, "what": a.what, "tool": tool_version(a.tool), "modules_tested_by": list(a.tests),
        "command": f"python scripts/mutation.py {area}", "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "wall_s": round(wall + (previous.get("wall_s", 0.0) if previous else 0.0), 1),
        "confirm_only_runs": (previous.get("confirm_only_runs", 0) + 1) if previous else 0,
        "modules": {m: {**counts(s), "statuses": s} for m, s in statuses.items()},
        "total": counts({f"{m}:{k}": v for m, s in statuses.items() for k, v in s.items()}),
        "confirmed": confirmed,
        "not_rechecked": not_rechecked,
        "reconfirmed_after_apply_fix": reconfirmed,
        "survivors": {name: diffs.get(name, "") for s in statuses.values() for name, v in s.items()
                      if v == "survived"},
    }
    if previous and previous.get("partial"):  # a stopped run's survivors, now confirmed: still a lower bound
        report.update({k: previous[k] for k in ("partial", "minutes_run", "mutants_per_minute",
                                                 "estimated_minutes_left") if k in previous})
    REPORTS.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    t = report["total"]
    print(f"[{area}] {t['mutants']} mutants: {t['killed']} killed, {t['timeout']} timeout, {t['survived']} survived, "
          f"kill ratio {t['kill_ratio']}; {wall:.0f} s; {report_path}", flush=True)
    return report


def partial_report(area: str) -> dict:
    """docs/mutation/<area>.json for a mutmut run stopped before the end: mutants checked so far.

    mutmut's own verdicts, unconfirmed (a confirmation can only turn a survivor into a kill, so
    the kill ratio over the checked mutants is a lower bound); the rate is mutants checked per
    minute since the work copy was made (a --resume'd run's pause counts as time)."""
    a = AREAS[area]
    work = work_dir(area)
    if a.tool != "mutmut" or not (work / "started.json").exists() or not (work / "mutants").exists():
        raise SystemExit(f"--partial needs an interrupted mutmut run of {area} made by this script (.mutation/{area})")
    started = json.loads((work / "started.json").read_text())
    statuses = mutmut_results(work, a)
    metas = [work / "mutants" / (m + ".meta") for m in a.modules]
    last = max(p.stat().st_mtime for p in metas)
    minutes = (last - started["time"]) / 60
    total = counts({f"{m}:{k}": v for m, s in statuses.items() for k, v in s.items()})
    checked = total["mutants"] - total["not checked"]
    rate = checked / minutes if minutes > 0 else None
    report = {
        "area": area, "what": a.what, "tool": tool_version(a.tool), "modules_tested_by": list(a.tests),
        "command": f"python scripts/mutation.py {area}", "commit": started["commit"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(last)), "partial": True,
        "minutes_run": round(minutes, 1), "mutants_per_minute": round(rate, 2) if rate else None,
        "estimated_minutes_left": round(total["not checked"] / rate) if rate else None,
        "modules": {m: {**counts(s), "statuses": s} for m, s in statuses.items()},
        "total": total,
        "survivors_unconfirmed": {n: mutant_diff(work, n) for s in statuses.values() for n, v in s.items()
                                  if v in ("survived", "no tests", "suspicious")},
    }
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"{area}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"[{area}] partial: {checked} of {total['mutants']} mutants checked in {minutes:.0f} min, "
          f"kill ratio so far {total['kill_ratio']}; about {report['estimated_minutes_left']} min left", flush=True)
    return report


def survivors() -> str:
    """Markdown: every confirmed survivor of every area, its changed line and why it survives.

    The reasons are docs/mutation/reasons.json, {area: {mutant name: reason}}, written by whoever
    read the mutant: "equivalent: <why no input tells it apart>" or "test to write: <which>"."""
    reasons_path = REPORTS / "reasons.json"
    reasons = json.loads(reasons_path.read_text()) if reasons_path.exists() else {}
    out = []
    for area in AREAS:
        path = REPORTS / f"{area}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        if r.get("partial") and not r.get("confirm_only_runs"):
            continue  # mutmut's unconfirmed verdicts: nothing to argue yet
        partial = ", partial: the mutants checked so far" if r.get("partial") else ""
        out.append(f"### {area} ({len(r['survivors'])} survivors{partial})\n")
        stale = set(r.get("not_rechecked", ()))
        for name, diff in r["survivors"].items():
            changed = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
            why = reasons.get(area, {}).get(name, "**no reason recorded**")
            if name in stale:
                why += " (not re-checked with the latest tests: the confirmation was stopped)"
            out.append(f"- `{name.rsplit('.', 1)[-1]}`: `{' / '.join(changed)}`: {why}")
        out.append("")
    return "\n".join(out)


def table() -> str:
    """The docs/TESTING.md table: one row per module, from docs/mutation/*.json."""
    lines = ["| area | module | tests | mutants | killed | timeout | survived | kill ratio | date, tool, commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for area in AREAS:
        path = REPORTS / f"{area}.json"
        if not path.exists():
            lines.append(f"| {area} | {', '.join(AREAS[area].modules)} | | not run | | | | | |")
            continue
        r = json.loads(path.read_text())
        tests = ", ".join(Path(t).name for t in r["modules_tested_by"])
        for module, c in r["modules"].items():
            ratio = "n/a" if c["kill_ratio"] is None else f"{100 * c['kill_ratio']:.1f}%"
            mutants = c["mutants"]
            if r.get("partial"):
                mutants = f"partial: {c['mutants'] - c['not checked']} of {c['mutants']} checked"
                ratio = f">= {ratio} ({'survivors confirmed' if r.get('confirm_only_runs') else 'unconfirmed'})"
            left = [n for n in r.get("not_rechecked", ()) if c["statuses"].get(n) == "survived"]
            if left:
                ratio += f" ({len(left)} survivors not re-checked with the latest tests)"
            lines.append(f"| {area} | {module} | {tests} | {mutants} | {c['killed']} | {c['timeout']} | "
                         f"{c['survived'] + c['suspicious']} | {ratio} | {r['date'][:16]}, {r['tool']}, "
                         f"{r['commit'][:10]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # a stopped run (SIGTERM) unwinds, so `confirm` puts the copy's source back
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("areas", nargs="*", help=f"areas to run ({', '.join(AREAS)}) or 'all'")
    p.add_argument("--list", action="store_true", help="print the areas and exit")
    p.add_argument("--table", action="store_true", help="print the markdown table of the last reports")
    p.add_argument("--survivors", action="store_true",
                   help="print every survivor of the last reports with its reason (docs/mutation/reasons.json)")
    p.add_argument("--confirm-only", action="store_true",
                   help="re-check only the last run's survivors against today's tests (after adding tests)")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1: a shared machine)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds one confirmation (or cosmic-ray) test run may take before it counts as a timeout")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with today's tests: mutants that already have a result are not "
                        "run again, and every one not killed is confirmed")
    p.add_argument("--reconfirm-ambiguous", action="store_true",
                   help="with --confirm-only: confirm again (only) the kills of mutants in a function whose name the "
                        "module defines twice (mutmut 3.8.1's apply, used before, may have mutated the other one)")
    p.add_argument("--partial", action="store_true",
                   help="report the areas' interrupted runs (mutants checked so far, rate, time left)")
    p.add_argument("--debug", action="store_true", help="mutmut's debug output (every pytest command) in the log")
    args = p.parse_args(argv)
    if args.list:
        for name, a in AREAS.items():
            print(f"{name}: {a.what}\n  modules: {' '.join(a.modules)}\n  tests:   {' '.join(a.tests)}\n"
                  f"  tool:    {a.tool}{' (selected functions)' if a.functions else ''}")
        return 0
    if args.table:
        print(table())
        return 0
    if args.survivors:
        print(survivors())
        return 0
    areas = list(AREAS) if args.areas == ["all"] else args.areas
    unknown = [x for x in areas if x not in AREAS]
    if unknown or not areas:
        p.error(f"name one or more areas of: {', '.join(AREAS)} (or 'all'); unknown: {unknown}")
    for area in areas:
        if args.partial:
            partial_report(area)
            continue
        run_area(area, args.jobs, args.confirm_only, args.timeout, args.debug, args.resume, args.reconfirm_ambiguous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
