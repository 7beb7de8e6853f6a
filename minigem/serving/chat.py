"""OpenAI chat messages -> the model's prompt ids, pixels and decoding settings.

Text parts are joined; each ``image_url`` part becomes an image placeholder where it stands
(images in conversation order). Every check on what a client sent happens here, before a
request reaches the engine, and fails with a 4xx ``APIError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minigem.data.records import Message
from minigem.errors import MinigemError
from minigem.generation.decode import GenerationConfig
from minigem.imagegen.markers import add_gen_marker_to_messages
from minigem.serving.errors import APIError, bad_request
from minigem.serving.images import load_image
from minigem.serving.schemas import ChatCompletionRequest, ChatMessage, ImagePart, ImageURL
from minigem.serving.settings import ServeSettings


@dataclass
class Prepared:
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    pixel_values_aux: torch.Tensor | None
    gen: GenerationConfig


def _content(msg: ChatMessage, k: int, image_token: str) -> tuple[str, list[str]]:
    """(text with placeholders, image URLs) of one message."""
    where = f"messages.{k}.content"
    if isinstance(msg.content, str):
        parts_text, urls = msg.content, []
        if image_token in parts_text:
            raise bad_request(f"{where}: text must not contain the image placeholder {image_token!r}; "
                              "send images as image_url parts", where)
        return parts_text, urls
    pieces: list[str] = []
    urls: list[str] = []
    for j, part in enumerate(msg.content):
        if isinstance(part, ImagePart):
            if msg.role != "user":
                raise bad_request(f"{where}.{j}: only user messages may contain images", f"{where}.{j}")
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            urls.append(url)
            pieces.append(image_token + "\n")
        else:
            if image_token in part.text:
                raise bad_request(f"{where}.{j}.text: text must not contain the image placeholder "
                                  f"{image_token!r}; send images as image_url parts", f"{where}.{j}.text")
            pieces.append(part.text)
    return "".join(pieces), urls


def to_messages(body: ChatCompletionRequest, image_token: str,
                settings: ServeSettings) -> tuple[list[Message], list[tuple[str, str]]]:
    """Model messages and (url, field) of every image, in placeholder order."""
    if len(body.messages) > settings.max_messages:
        raise bad_request(f"messages: {len(body.messages)} messages, over the limit of "
                          f"{settings.max_messages}", "messages")
    messages: list[Message] = []
    images: list[tuple[str, str]] = []
    for k, msg in enumerate(body.messages):
        text, urls = _content(msg, k, image_token)
        messages.append(Message(msg.role, text))
        images += [(u, f"messages.{k}.content") for u in urls]
    if len(images) > settings.max_images:
        raise bad_request(f"messages: {len(images)} images, over the limit of {settings.max_images} "
                          "per request", "messages", "too_many_images")
    return messages, images


def gen_config(body: ChatCompletionRequest, prompt_len: int, model, settings: ServeSettings) -> GenerationConfig:
    asked = body.max_completion_tokens or body.max_tokens
    room = model.config.max_length - prompt_len
    if asked is not None and asked > settings.max_tokens_limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise bad_request(f"{param}: {asked} is over this server's limit of {settings.max_tokens_limit}", param)
    if asked is not None and asked > room:
        raise bad_request(f"this model's maximum context length is {model.config.max_length} tokens; "
                          f"the prompt has {prompt_len} and max_tokens asks for {asked} more",
                          "messages", "context_length_exceeded")
    max_new = asked or min(settings.default_max_tokens, room)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(len(s) > 64 for s in stops):
        raise bad_request("stop: at most 4 stop strings of at most 64 characters", "stop")
    # below 0.01 the scaled logits overflow softmax: such settings mean greedy anyway
    temperature = 0.0 if body.top_p == 0 or body.temperature < 0.01 else body.temperature
    seed = None if body.seed is None else body.seed % 2**63
    return GenerationConfig(
        max_new_tokens=max_new, temperature=temperature, top_p=body.top_p or 1.0,
        stop=tuple(s for s in stops if s) + tuple(model.template.stop_strings), seed=seed,
    )


def prepare(model, settings: ServeSettings, body: ChatCompletionRequest) -> Prepared:
    """Validate and encode one request (runs in a worker thread: decodes images)."""
    messages, refs = to_messages(body, model.config.image_token, settings)
    if body.modalities and "image" in body.modalities:
        try:
            messages = add_gen_marker_to_messages(messages)  # the user turn asks for an image
        except MinigemError as err:
            raise bad_request(str(err), "messages") from None
    limit = min(settings.max_prompt_tokens or model.config.max_length, model.config.max_length)
    if sum(len(m.content) for m in messages) > 64 * limit:  # surely too long: skip tokenizing
        raise bad_request(f"the prompt is too long: the limit is {limit - 1} tokens", "messages",
                          "context_length_exceeded")
    images = [load_image(url, settings, where) for url, where in refs]
    try:
        ids = model.encode_prompt(messages, len(images))
    except MinigemError as err:
        raise bad_request(str(err), "messages") from None
    if len(ids) >= limit:
        raise bad_request(f"the prompt is too long: {len(ids)} tokens, the limit is {limit - 1}",
                          "messages", "context_length_exceeded")
    gen = gen_config(body, len(ids), model, settings)
    try:
        pix = model.processor(images)
    except MinigemError as err:
        raise bad_request(str(err), "messages") from None
    return Prepared(ids, pix["pixel_values"], pix["pixel_values_aux"], gen)


def check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                       "model", "model_not_found")
