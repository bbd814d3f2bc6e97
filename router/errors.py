"""The errors the front door answers with, in OpenAI's shape: `{"error": {"message", "type",
"param", "code"}}`, and how a failure of the LLMServer call maps to one."""

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from kvserve.router.openai_schema import validation_problem

class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param)


def invalid_value(error: RequestValidationError | ValidationError) -> OpenAIError:
    """A 400 naming the first field pydantic refused."""
    return bad_request(*validation_problem(error.errors()[0]))


RETRY_AFTER_S = 1


def unknown_model(name: str | None, served: list[str]) -> OpenAIError:
    said = "no model was named" if name is None else f"the model {name!r} does not exist"
    return OpenAIError(404, f"{said}; this server serves {', '.join(map(repr, served))}",
                       "invalid_request_error", "model", "model_not_found")


def unknown_lora(name: str) -> OpenAIError:
    return OpenAIError(404, f"The lora adapter {name!r} cannot be found.", "NotFoundError", "lora_name")


class RetryLater(OpenAIError):
    """An error that says when to come back (`Retry-After`)."""

    def response(self) -> JSONResponse:
        reply = super().response()
        reply.headers["retry-after"] = str(RETRY_AFTER_S)
        return reply


def refusal(reason: str, overloaded: bool) -> OpenAIError:
    """The replica's refusal of a request: its own problem (400), or too much load now (503)."""
    if overloaded:
        return RetryLater(503, reason, "server_error", code="server_overloaded")
    return bad_request(reason)


def replica_died(error: BaseException) -> bool:
    """Whether the replica serving a call died (the error may come wrapped in a task error)."""
    return isinstance(error, RayActorError) or isinstance(getattr(error, "cause", None), RayActorError)


def engine_error(error: Exception) -> OpenAIError:
    """Map a failure from the LLMServer call to an HTTP error."""
    if isinstance(error, BackPressureError):
        return RetryLater(429, "too many requests are waiting for the model: retry after a moment",
                          "requests", code="rate_limit_exceeded")
    if replica_died(error):
        return RetryLater(503, "the replica serving this request stopped before it finished: retry the request",
                          "server_error", code="replica_stopped")
    if isinstance(error, OpenAIError):
        return error
    cause = error.cause if isinstance(error, RayTaskError) else error
    return OpenAIError(500, f"internal error: {cause!r}", "internal_error")
