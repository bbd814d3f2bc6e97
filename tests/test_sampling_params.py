import pydantic
import pytest

from kvserve.workers.engine.sampling_params import SamplingParams


def test_defaults_are_vllm_defaults():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (params.max_tokens, params.min_tokens, params.seed, params.logprobs) == (16, 0, None, None)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.stop == [] and params.stop_token_ids == []
    assert not params.ignore_eos and not params.include_stop_str_in_output and params.skip_special_tokens
    assert not params.greedy and not params.uses_penalties


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"temperature": -1}, "temperature must be >= 0, got -1"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -2}, "top_k must be -1 or 0 .off., or >= 1, got -2"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\], got -3"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 3}, "min_tokens must be <= max_tokens, got min_tokens=5, max_"),
        ({"logprobs": 21}, r"logprobs must be in \[0, 20\], got 21"),
        ({"logprobs": -1}, r"logprobs must be in \[0, 20\], got -1"),
        ({"stop": ["ok", ""]}, "stop must be non-empty strings"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids must be token ids >= 0"),
        ({"seed": 2**64}, "seed must be a signed 64-bit integer"),
        ({"temperature": float("nan")}, "temperature\n.*finite number"),
        ({"top_p": float("inf")}, "top_p\n.*finite number"),
        ({"max_tokens": 1.5}, "max_tokens\n.*valid integer"),
        ({"best_of": 2}, "best_of\n.*Extra inputs are not permitted"),
    ],
)
def test_invalid_values_are_named_with_the_problem(options, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        SamplingParams(**options)


def test_validation_errors_are_value_errors():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)


@pytest.mark.parametrize(
    "options",
    [
        {"top_k": -1},
        {"top_p": 1e-9},
        {"min_p": 1.0},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"logprobs": 0},
        {"logprobs": 20},
        {"min_tokens": 16, "max_tokens": 16},
        {"seed": -1},
    ],
)
def test_edges_of_the_ranges_are_accepted(options):
    SamplingParams(**options)


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]


@pytest.mark.parametrize(
    "options, greedy",
    [
        ({"temperature": 0}, True),
        ({"temperature": 1e-6}, True),
        ({"top_k": 1}, True),
        ({"temperature": 0.01}, False),
        ({"top_k": 2}, False),
    ],
)
def test_greedy(options, greedy):
    assert SamplingParams(**options).greedy is greedy


@pytest.mark.parametrize(
    "options", [{"repetition_penalty": 1.1}, {"presence_penalty": 0.5}, {"frequency_penalty": -0.5}]
)
def test_uses_penalties(options):
    assert SamplingParams(**options).uses_penalties


def test_params_are_frozen():
    params = SamplingParams()
    with pytest.raises(pydantic.ValidationError):
        params.temperature = 0.5
