"""`/v1/embeddings`: OpenAI's request and response shapes over the pipeline's pooled hidden states.

A model the catalogue marks `embeddings: true` (transformers backend) answers with the mean of each
input's final-normed hidden states, L2-normalised, computed through the same stages as chat; every
input of a request goes through the scheduler together. The prompt tokens are held for and settled
through the same payments path as chat (no completion tokens).
"""

import asyncio
import base64
import logging
import struct
import uuid
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from payments.protocol import SETTLEMENT_HEADER
from serve_apps.gateway.backend import PipelineLost
from serve_apps.gateway.errors import OpenAIError
from serve_apps.gateway.openai_protocol import Text, _encodable
from serve_apps.protocol import Embedded, EmbedRequest, Finished, Rejected

MAX_INPUTS = 2048  # OpenAI's bound on the inputs of one request
REPLICA_RETRIES = 2  # a request whose replica died before answering is re-sent this many times
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
logger = logging.getLogger(__name__)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, strictly: unknown fields and empty inputs are 400s naming the field."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1, max_length=256)
    input: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="A text, a list of texts, a list of token ids, or a list of token id lists."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1, le=65_536, description="Only the model's own size.")
    user: Text | None = Field(default=None, max_length=256)

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: object) -> object:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ValueError("input must not be empty")
        if len(items) > MAX_INPUTS and not all(isinstance(item, int) for item in items):
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise ValueError("input strings must not be empty")
                _encodable(item)
            elif isinstance(item, list) and not item:
                raise ValueError("input token lists must not be empty")
        return value

    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        """Each input: a text, or token ids (a flat list of ints is one input)."""
        value = self.input
        if isinstance(value, str):
            return (value,)
        if all(isinstance(item, int) for item in value):
            return (tuple(value),)  # type: ignore[arg-type]
        return tuple(item if isinstance(item, str) else tuple(item) for item in value)  # type: ignore[union-attr]


def to_embed_request(gateway, body: EmbeddingRequest) -> EmbedRequest:  # type: ignore[no-untyped-def]
    """The replica's request; 404 for an unknown model, 400 for one not marked embedding-capable."""
    card = gateway.cards.get(body.model)
    if card is None or body.model not in gateway.backend.models():
        raise OpenAIError(404, f"The model `{body.model}` does not exist.", "model", "model_not_found")
    if not card.embeddings:
        served_by = f" (its {card.backend} backend serves no embeddings)" if card.backend != "transformers" else ""
        raise OpenAIError(
            400,
            f"The model `{body.model}` does not serve embeddings{served_by}; the catalogue marks the models that do.",
            "model",
            "model_not_embedding",
        )
    return EmbedRequest(f"embd-{uuid.uuid4().hex}", body.model, body.inputs(), body.dimensions)


async def create_embeddings(gateway, body: EmbeddingRequest, authorization: str | None) -> JSONResponse:  # type: ignore[no-untyped-def]
    """Authenticate, hold the prompt's bound, embed every input, settle the prompt tokens, answer."""
    identity = await gateway.caller(authorization)
    request = to_embed_request(gateway, body)
    # The ledger holds at least one completion token; the settlement charges the prompt tokens only.
    payer = await gateway.metering.admit(identity, request, 1)
    request = EmbedRequest(request.request_id, request.model, request.inputs, request.dimensions, payer)
    hold = gateway.metering.closer(request, payer)
    try:
        answer = await _embedded(gateway, request)
    except BaseException:
        hold.release("failed")
        raise
    settlement_id = await asyncio.shield(
        hold.settle(Finished("stop", answer.prompt_tokens, 0, providers=answer.providers))
    )
    result = response_body(request, answer, body.encoding_format)
    headers = {"x-request-id": request.request_id}
    if settlement_id is not None:
        result["settlement_id"] = settlement_id
        headers[SETTLEMENT_HEADER] = settlement_id
    return JSONResponse(result, headers=headers)


async def _embedded(gateway, request: EmbedRequest) -> Embedded:  # type: ignore[no-untyped-def]
    for attempt in range(1, REPLICA_RETRIES + 2):
        try:
            answer = await asyncio.wait_for(gateway.backend.embed(request), gateway.request_timeout_s)
        except PipelineLost as exc:
            logger.warning("replica lost during %s (attempt %d): %s", request.request_id, attempt, exc)
            continue
        except TimeoutError:
            raise OpenAIError(504, "timed out waiting for the pipeline", code="timeout") from None
        if isinstance(answer, Rejected):
            headers = {"Retry-After": str(max(1, int(answer.retry_after_s)))} if answer.retry_after_s else None
            raise OpenAIError(answer.status, answer.message, answer.param, answer.code, headers)
        if len(answer.vectors) != len(request.inputs):
            raise OpenAIError(500, "the pipeline answered a different number of embeddings", code="internal_error")
        return answer
    raise OpenAIError(
        503, "the pipeline replica was lost; retry later", code="pipeline_unavailable", headers={"Retry-After": "5"}
    )


def response_body(request: EmbedRequest, answer: Embedded, encoding_format: str) -> dict:
    """OpenAI's embeddings list: base64 is the little-endian float32 bytes, as OpenAI sends them."""
    data = [
        {"object": "embedding", "index": index, "embedding": encode_vector(vector, encoding_format)}
        for index, vector in enumerate(answer.vectors)
    ]
    usage = {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens}
    return {"object": "list", "data": data, "model": request.model, "usage": usage}


def encode_vector(vector: tuple[float, ...], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)
