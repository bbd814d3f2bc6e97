"""What makes a request impossible to serve, known before any model runs: the prompt itself;
and the refusal of one a replica is too far behind to take now (`Scheduler.overload` decides)."""


def prompt_length_problem(num_tokens: int, max_model_len: int) -> str | None:
    """Why a prompt of `num_tokens` cannot be served under `max_model_len`, or None. The
    ingress answers with it (400) before routing; the engine refuses with it as well, for
    callers that reach it directly."""
    if num_tokens == 0:
        return "the prompt is empty"
    if num_tokens >= max_model_len:
        return (f"the prompt has {num_tokens} tokens; with max_model_len {max_model_len} there is "
                "no room to generate")
    return None


class Overloaded(ValueError):
    """A refusal that says nothing of the request: the replica is too far behind to take it
    now, and the same request may be served later or elsewhere (HTTP 503 with Retry-After)."""
