"""The chat-completions API as pydantic models (FastAPI's convention): request and response bodies,
so ``/openapi.json`` describes what the server really takes and returns.

Every field the ``openai`` client can send is in one of three groups (tests/test_serve_api.py walks
the client's own parameter list against them):

- honoured: see ``ChatRequest``'s fields and docs/serving.md;
- accepted without effect on the output (``NO_EFFECT``): ``user``, ``safety_identifier``,
  ``metadata``, ``prompt_cache_key`` are logged (logger ``edgevlm.serve``), the prefix cache is
  automatic;
- refused (``REFUSED``): typed here so that only a harmless value passes (null, ``tools: []``,
  ``tool_choice: "none"``, ``store: false`` ...); anything else is a 400 naming the field.

Unknown fields are refused too (``extra="forbid"``): nothing a client sends is silently ignored.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- messages ---------------------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str = Field(min_length=1, description="a base64 data: URI, or a path under --image-root")
    detail: Optional[Literal["auto", "low", "high"]] = Field(
        None, description="accepted; the model has one input resolution, so it does not change the answer")


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: Union[ImageURL, Annotated[str, Field(min_length=1)]]


class VideoURL(Strict):
    url: str = Field(min_length=1, description="a base64 data: URI (data:video/mp4;base64,...), or a path under "
                     "--image-root; sampled to --video-frames frames (runtime/serve/video.py)")


class VideoPart(Strict):
    type: Literal["video_url"]
    video_url: Union[VideoURL, Annotated[str, Field(min_length=1)]]


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is read as system; tool and function messages are not supported")
    content: Union[str, list[Part]]
    name: Optional[None] = Field(None, description="not supported: participant names are not in the template")


# --- response_format ---------------------------------------------------------------------------------


class FormatText(Strict):
    type: Literal["text"]


class FormatJsonObject(Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = Field(None, description="true: additionalProperties false and every "
                                   "property required where the schema leaves them open (OpenAI's strict mode)")


class FormatJsonSchema(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[FormatText, FormatJsonObject, FormatJsonSchema], Field(discriminator="type")]


class StreamOptions(Strict):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[Literal[False]] = Field(
        None, description="only false: no obfuscation padding is added to chunks")


# --- the request ---------------------------------------------------------------------------------------

NO_EFFECT = ("user", "safety_identifier", "metadata", "prompt_cache_key", "parallel_tool_calls")
REFUSED = ("modalities", "audio", "function_call", "functions", "moderation", "prediction",
           "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "service_tier", "store",
           "tool_choice", "tools", "verbosity", "web_search_options")
NOT_SUPPORTED = "not supported by this server"


class ChatRequest(Strict):
    """POST /v1/chat/completions. Greedy unless temperature > 0."""

    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = Field(None, description="any name is served (the response names the served "
                                 "model) unless the server runs with --strict-model: then 404")
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[FiniteFloat] = Field(None, ge=0, le=2)
    top_p: Optional[FiniteFloat] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, description="extension (llama-server): 0 = off")
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    n: Optional[Literal[1]] = Field(None, description="one choice per request")
    stop: Optional[Union[Annotated[str, Field(min_length=1)],
                         Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]]] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, description="needs logprobs: true")
    logit_bias: Optional[dict[str, Annotated[FiniteFloat, Field(ge=-100, le=100)]]] = Field(
        None, description="token id (as a string) -> bias added to its logit; -100 bans the token")
    presence_penalty: Optional[FiniteFloat] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[FiniteFloat] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[FiniteFloat] = Field(None, gt=0, le=10, description="extension (llama-server's "
                                                      "repeat_penalty, CTRL style); 1 = off")
    # accepted, no effect on the answer; logged
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    prompt_cache_key: Optional[str] = Field(None, description="the prefix cache is automatic")
    parallel_tool_calls: Optional[bool] = Field(None, description="no tools are ever called")
    # refused unless harmless (typed so): a 400 naming the field
    modalities: Optional[list[Literal["text"]]] = Field(None, description="text output only")
    audio: Optional[None] = Field(None, description=NOT_SUPPORTED)
    function_call: Optional[Literal["none"]] = Field(None, description=NOT_SUPPORTED)
    functions: Optional[Annotated[list[Any], Field(max_length=0)]] = Field(None, description=NOT_SUPPORTED)
    moderation: Optional[None] = Field(None, description=NOT_SUPPORTED)
    prediction: Optional[None] = Field(None, description=NOT_SUPPORTED)
    prompt_cache_options: Optional[None] = Field(None, description=NOT_SUPPORTED)
    prompt_cache_retention: Optional[None] = Field(None, description=NOT_SUPPORTED)
    reasoning_effort: Optional[Literal["none"]] = Field(None, description="not a reasoning model")
    service_tier: Optional[Literal["auto", "default"]] = Field(None, description="one tier")
    store: Optional[Literal[False]] = Field(None, description="completions are never stored")
    tool_choice: Optional[Literal["none"]] = Field(None, description=NOT_SUPPORTED)
    tools: Optional[Annotated[list[Any], Field(max_length=0)]] = Field(None, description=NOT_SUPPORTED)
    verbosity: Optional[None] = Field(None, description=NOT_SUPPORTED)
    web_search_options: Optional[None] = Field(None, description=NOT_SUPPORTED)


# --- responses -----------------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[ChoiceLogprobs] = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt positions whose KV cache was reused (the prefix cache)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    timings: dict[str, Any] = Field(description="extension: the runtime's timings and cache report")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "edgevlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    backend: str
    queue_depth: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    error: ErrorDetail


SSE_DOC = {"description": "with stream: true, server-sent events: chat.completion.chunk objects, then "
                          "`data: [DONE]`", "content": {"text/event-stream": {"schema": {"type": "string"}}}}
