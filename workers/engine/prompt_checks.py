"""What makes a request impossible to serve, known before any model runs: the prompt itself,
or a replica too far behind to start it in time."""


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


def queue_wait_problem(waited_s: float, max_queue_wait_s: float | None) -> str | None:
    """Why a replica whose longest-waiting request has waited `waited_s` for its first step
    refuses a new one under `max_queue_wait_s` (None: never), or None. Past saturation the
    newcomer would wait about as long behind it: refused at once, it can be retried, and the
    requests already waiting do not wait longer for it."""
    if max_queue_wait_s is None or waited_s <= max_queue_wait_s:
        return None
    return (f"the server is overloaded: a request has waited {waited_s:.1f} s for its first step on this "
            f"replica (max_queue_wait_s {max_queue_wait_s:g}); retry after a moment")
