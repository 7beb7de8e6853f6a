"""Request and response bodies of the OpenAI-compatible API (pydantic; they make the OpenAPI schema).

Requests forbid unknown fields, as OpenAI does ("Unrecognized request argument"), so a typo
is an error rather than silently ignored. Limits that depend on the server's settings
(images, tokens) are checked later, in ``minigem.serving.chat``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(Strict):
    url: str = Field(max_length=32 * 2**20, description="a data: URL (base64), or http(s) when enabled")
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str = Field(description="{url: ...} or the URL as a bare string")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = Field(None, max_length=64)


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: str | None = Field(None, description="the served model's id (default: that model)")
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text", "image"]] | None = Field(
        None, description='minigem extension: ["text", "image"] also asks for a generated image')
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="only 0 is supported")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="only 0 is supported")
    logprobs: Literal[False] = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ImageOutput(BaseModel):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    images: list[ImageOutput] | None = None  # minigem extension (modalities with "image")


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ImageGenerationRequest(Strict):
    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(1, ge=1, le=4)
    size: str | None = Field(None, pattern=r"^\d{1,4}x\d{1,4}$|^auto$")
    response_format: Literal["b64_json"] | None = Field(None, description="only b64_json")
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minigem"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    image_generation: bool
    mining: bool = Field(False, description="a Mini-Gemini model: POST /v1/explain is available")
    auth_required: bool
    max_images: int
    max_tokens_limit: int
    queued: int
    running: int


class ExplainRequest(Strict):
    """``POST /v1/explain`` (minigem extension, Mini-Gemini models): answer a question about
    one image and show where its low-res tokens looked in the high-res image."""

    model: str | None = None
    image_url: ImageURL | str = Field(description="{url: ...} or the URL as a bare string "
                                      "(a data: URL; http(s) when the server allows it)")
    question: str = Field(min_length=1, max_length=4000)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy (default)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    top_tokens: int = Field(5, ge=0, le=64, description="how many relied-on LR tokens to outline")


class ExplainToken(BaseModel):
    rank: int
    view: str  # "image"; HD: "global", "crop(r,c)"
    view_index: int
    token: int  # index within its view
    row: int  # cell of the LR token grid
    col: int
    score: float  # share of the answer's attention to visual tokens
    box: list[int]  # [x0, y0, x1, y1] of its sub-region, in HR image pixels
    peak: list[int]  # [x, y] centre of the HR cell it attended to most


class ExplainResponse(BaseModel):
    object: Literal["explanation"] = "explanation"
    model: str
    answer: str
    heatmap: str = Field(description="the rendered heat map, a data:image/png;base64 URL")
    hr_size: int
    views: list[str]
    tokens_per_view: int
    lr_grid: int
    cells_per_token: int
    visual_attention: float
    top_tokens: list[ExplainToken]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
