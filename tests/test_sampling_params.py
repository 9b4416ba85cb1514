"""SamplingParams: every rule of `validate` and `from_dict`, as plain Python (nothing compiled).

Kept apart from test_sampling.py so the mutation area `sampling` (scripts/mutation.py) kills a
mutant of the validation before any test compiles a JAX program.
"""

from __future__ import annotations

import math

import pytest

from nemojax.inference.sampling import SamplingError, SamplingParams


def test_sampling_params_validation_names_the_field():
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams(temperature=-0.1).validate()
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(SamplingError, match="top_k"):
        SamplingParams(top_k=1.5).validate()
    with pytest.raises(SamplingError, match="max_tokens"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(SamplingError, match="stop"):
        SamplingParams(stop=[""]).validate()
    with pytest.raises(SamplingError, match="n="):
        SamplingParams(n=0).validate()
    assert SamplingParams(stop="###").validate().stop == ["###"]
    p = SamplingParams.from_dict({"temperature": 0, "top_k": 5, "prompt": "ignored"},
                                 SamplingParams(max_tokens=7, stop=["a"]))
    assert (p.temperature, p.top_k, p.max_tokens, p.stop) == (0.0, 5, 7, ["a"])


# Every rule of SamplingParams.validate at its boundary: (field, bad value, the message's reason).
# Guards mutants that move a bound (`< 0` to `<= 0`, `<= 1` to `< 1`), drop a type check, or change
# the message a client reads (the full message is compared, not a substring).
_BAD = [
    ("temperature", -0.1, "must be a number >= 0 (0 = greedy)"),
    ("temperature", "1", "must be a number >= 0 (0 = greedy)"),
    ("temperature", math.inf, "must be a finite number"),
    ("temperature", math.nan, "must be a finite number"),
    ("top_p", 0, "must be in (0, 1]"),
    ("top_p", 1.0001, "must be in (0, 1]"),
    ("top_p", "0.5", "must be in (0, 1]"),
    ("top_k", -1, "must be an integer >= 0 (0 = off)"),
    ("top_k", True, "must be an integer >= 0 (0 = off)"),
    ("min_p", -0.01, "must be in [0, 1]"),
    ("min_p", 1.01, "must be in [0, 1]"),
    ("min_p", None, "must be in [0, 1]"),
    ("prompt_logprobs", 1, "must be true or false"),
    ("max_tokens", 0, "must be an integer >= 1 (0 only with prompt_logprobs)"),
    ("max_tokens", 2.0, "must be an integer >= 1 (0 only with prompt_logprobs)"),
    ("stop", 5, "must be a string or a list of non-empty strings"),
    ("stop", ["a", 3], "must be a string or a list of non-empty strings"),
    ("stop_token_ids", [-1], "must be a list of token ids >= 0"),
    ("stop_token_ids", [1.0], "must be a list of token ids >= 0"),
    ("stop_token_ids", (1,), "must be a list of token ids >= 0"),
    ("seed", -1, "must be an integer >= 0 or null"),
    ("seed", 1.5, "must be an integer >= 0 or null"),
    ("n", 1.0, "must be an integer >= 1"),
    ("logprobs", 1, "must be true or false"),
    ("top_logprobs", 21, f"must be an integer in [0, {20}]"),
    ("top_logprobs", -1, f"must be an integer in [0, {20}]"),
    ("top_logprobs", 2.0, f"must be an integer in [0, {20}]"),
]


@pytest.mark.parametrize("name,value,why", _BAD, ids=[f"{n}={v!r}" for n, v, _ in _BAD])
def test_each_bad_sampling_parameter_is_refused_with_its_full_message(name, value, why):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**{name: value}).validate()
    assert str(e.value) == f"{name}={value!r}: {why}"


def test_the_boundary_values_themselves_are_accepted_and_numbers_become_floats():
    """Each bound's own value is legal (guards `<` / `<=` swaps the refusals above miss)."""
    ok = SamplingParams(temperature=0, top_p=1, top_k=0, min_p=1, seed=0, n=1, top_logprobs=20,
                        stop=[], stop_token_ids=[0], logprobs=True).validate()
    assert (type(ok.temperature), type(ok.top_p), type(ok.min_p)) == (float, float, float)
    assert (ok.temperature, ok.top_p, ok.min_p) == (0.0, 1.0, 1.0)
    assert SamplingParams(min_p=0, top_p=1e-9, seed=None, max_tokens=1).validate().min_p == 0.0
    assert SamplingParams(max_tokens=0, prompt_logprobs=True).validate().max_tokens == 0
    with pytest.raises(SamplingError, match="max_tokens=-1"):
        SamplingParams(max_tokens=-1, prompt_logprobs=True).validate()


def test_from_dict_copies_the_defaults_lists():
    """A request's stop list is its own: from_dict must not share (and then extend) the defaults'."""
    defaults = SamplingParams(stop=["a"], stop_token_ids=[3])
    p = SamplingParams.from_dict({}, defaults)
    p.stop.append("b")
    p.stop_token_ids.append(4)
    assert (defaults.stop, defaults.stop_token_ids) == (["a"], [3])
    assert SamplingParams.from_dict({"seed": 5}).seed == 5 and SamplingParams.from_dict({}).seed is None
