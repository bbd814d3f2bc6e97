"""Request bodies and schemas that several serving tests send."""

import random
from typing import Annotated, Literal

from pydantic import BaseModel, Field


class Order(BaseModel):
    size: Literal["small", "large"]
    count: Annotated[int, Field(ge=1, le=99)]
    paid: bool


WEATHER = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}


def random_tokens(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(count)]
