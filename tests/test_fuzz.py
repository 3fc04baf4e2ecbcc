"""API fuzz test: random arguments of random types, shapes and values for every public operator,
each call in a worker subprocess (the harness is tests/fuzz.py). Every call returns, or raises
ValueError, TypeError or MemoryError; a failure lists each bad (seed, index), the outcome and a
minimised reproducer.

CI runs a fixed set of calls; ``ROIALIGN_FUZZ_CALLS=20000 ROIALIGN_FUZZ_SEED=7 pytest
tests/test_fuzz.py`` runs more (or ``python tests/fuzz.py --calls 20000 --seed 7``).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import fuzz

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the worker runs under RLIMIT_AS and is read with select (Linux)")

# 2000 calls take about 10 s on two cores (plus up to 30 s to minimise failures)
CALLS = int(os.environ.get("ROIALIGN_FUZZ_CALLS", "2000"))
SEED = int(os.environ.get("ROIALIGN_FUZZ_SEED", "20261129"))


def test_public_api_fuzz():
    report = fuzz.fuzz(CALLS, SEED, shrink_seconds=30.0)
    assert sum(report["counts"].values()) == CALLS
    assert not report["groups"], fuzz.format_report(report)


# the harness itself: a failure must be the library's, found reproducibly


def _case(target, *positional, lines=(), invalid=""):
    args = {f"a{i}": fuzz._arg([], src, "", invalid) for i, src in enumerate(positional)}
    if lines:
        args["a0"]["lines"] = list(lines)
    return {"target": target, "seed": 0, "index": 0, "positional": list(args), "args": args, "base": {}}


def test_runner_classifies_every_outcome():
    runner = fuzz.Runner(timeout=2.0, memory=1 << 30)
    try:
        def outcome(case):
            return runner.run(case)["outcome"]

        assert outcome(_case("operator.truediv", "1", "2")) == "returned"
        assert outcome(_case("math.sqrt", "-1")) == "ValueError"
        assert outcome(_case("operator.truediv", "1", "'2'")) == "TypeError"
        # 2 GiB cannot be had under the 1 GiB address-space limit
        assert outcome(_case("numpy.ones", "1 << 28")) == "MemoryError"
        r = runner.run(_case("operator.truediv", "1", "0"))
        assert (r["outcome"], fuzz.key(r)) == ("exception", ("exception", "ZeroDivisionError"))
        r = runner.run(_case("faulthandler._sigsegv"))
        assert (r["outcome"], fuzz.key(r)) == ("crash", ("crash", "SIGSEGV"))
        assert outcome(_case("time.sleep", "30")) == "hang"
        # the harness's own errors are not the library's
        assert outcome(_case("operator.truediv", "x", "1", lines=["x = 1 / 0"])) == "harness"
        assert outcome(_case("operator.truediv", "1", "2", invalid="refused")) == "accepted-invalid"
        # a new worker takes over after a crash or a hang
        assert outcome(_case("operator.truediv", "1", "2")) == "returned"
        assert runner.restarts == 2
    finally:
        runner.close()


def test_cases_are_reproducible_snippets():
    runner = fuzz.Runner()
    seen = set()
    try:
        for index in range(40):
            target = list(fuzz.TARGETS)[index % len(fuzz.TARGETS)]
            case = fuzz.generate(target, SEED, index)
            assert case == fuzz.generate(target, SEED, index)
            outcome = runner.run(case)["outcome"]
            if outcome in ("returned", "ValueError") and outcome not in seen:
                seen.add(outcome)
                # the printed snippet is exactly the call the worker ran
                root, env = fuzz.package_env()
                run = subprocess.run([sys.executable, "-c", fuzz.source(case)], capture_output=True,
                                     text=True, cwd=root, env=env)
                assert (run.returncode == 0) == (outcome == "returned"), run.stderr
                assert outcome == "returned" or run.stderr.splitlines()[-1].startswith("ValueError")
    finally:
        runner.close()
    assert seen == {"returned", "ValueError"}


def _hand_case(target, **keywords):
    """A small valid call of ``target``; ``keywords`` maps more arguments to (lines, source)."""
    args = {"features": (["features = np.linspace(0, 1, 32).reshape(1, 2, 4, 4)"], "features"),
            "boxes": (["boxes = np.array([[0, 0.5, 0.5, 2.5, 3.0]])"], "boxes"),
            "output_size": ([], "(2, 2)")}
    if target.endswith("backward"):
        args = {"grad_output": (["grad_output = np.ones((1, 2, 2, 2))"], "grad_output"), **args}
    positional = list(args)
    args.update(keywords)
    return {"target": target, "seed": 0, "index": 0, "positional": positional, "base": {},
            "args": {n: fuzz._arg(lines, src, n) for n, (lines, src) in args.items()}}


def _checked(case, tamper=lambda result, values: None):
    """The invariant the call of ``case`` breaks once ``tamper`` has changed its result or inputs."""
    fn, values = fuzz.evaluate(case)
    pre = fuzz._before(case, values)
    kw = {n: v for n, v in values.items() if n not in case["positional"]}
    result = fn(*[values[n] for n in case["positional"]], **kw)
    tamper(result, values)
    return fuzz._after(case, fn, values, result, pre)


def test_invariants_catch_wrong_results():
    forward, backward = _hand_case("roi_align"), _hand_case("roi_align_backward")
    assert _checked(forward) == "" and _checked(backward) == ""

    def nan(result, values):
        result[0, 0, 0, 0] = np.nan

    def move_box(result, values):
        values["boxes"][0, 1] += 1

    assert _checked(forward, nan) == "NaN in the output from finite inputs"
    assert _checked(backward, move_box) == "the call changed its input boxes"
    out = _hand_case("roi_align", out=(["out = np.empty((1, 2, 2, 2))"], "out"))
    assert _checked(out) == ""
    assert _checked(out, lambda result, values: result.fill(0)).startswith("out= result differs")
    # list boxes give a list of gradients, one per image
    listed = _hand_case("roi_align_backward", wrt=([], "'boxes'"),
                        boxes=(["boxes = [np.array([[0.5, 0.5, 2.5, 3.0]])]"], "boxes"))
    assert _checked(listed) == ""
    assert _checked(listed, lambda result, values: result.append(result[0])).startswith("box gradient")
