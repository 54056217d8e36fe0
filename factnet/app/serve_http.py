"""``factnet serve``'s HTTP surface, without Ray: requests read into queries (JSON or multipart, float lists or
images), every bad request a `RequestError` with its 4xx status, answers with the top classes, and the FastAPI
app (`make_api`); `factnet.app.serve_ray` declares the same routes on its deployment, its ingress.

A request is ``{"user": NAME or null, "input": [...]}`` (one preprocessed sample) or ``{"user": ..., "image":
"<base64 of a PNG or JPEG file>"}``, each with an optional ``"top_k"``; or ``multipart/form-data`` with a ``file``
part (the image) and ``user`` / ``top_k`` fields. Images are preprocessed on the server as the model's timm data
config says (`Preprocess`).
"""

import base64
import binascii
import io
import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from factnet import FactnetError

__all__ = ["Endpoint", "Limits", "Preprocess", "Query", "RequestError", "health_response", "make_api", "new_api",
           "predict_response", "read_query"]

USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a plain file stem: no path, no leading dot
FIELDS = ("user", "input", "image", "top_k")
FORM_FIELDS = ("user", "top_k", "file")
IMAGE_FORMATS = ("PNG", "JPEG")
IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # what converts to L or RGB without guessing
DEFAULT_TOP_K = 5


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_body_bytes: int = 8 * 2**20
    max_image_pixels: int = 40_000_000  # a decoded image larger than this is refused (413)
    min_image_side: int = 2  # an image narrower or lower than this holds nothing to classify (422)


@dataclass(frozen=True)
class Query:
    """One request, read: whose adapter, one input of the model's sample shape, how many top classes."""

    user: str | None
    x: Tensor
    top_k: int


class Preprocess:
    """An image file into one input, as the model's timm data config says (`timm.data.resolve_data_config` and
    `create_transform`, eval mode) at the model's own input size ``shape`` (C, H, W); ``mean``/``std`` override the
    config's. A model of 1 or 3 channels; the config's mean and std must have as many values."""

    def __init__(self, model: nn.Module, shape: Sequence[int], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        from timm.data import create_transform, resolve_data_config

        if len(shape) != 3 or shape[0] not in (1, 3):
            raise FactnetError(f"images need a model of 1- or 3-channel (C, H, W) inputs, this one takes {list(shape)}")
        config = resolve_data_config({}, model=model)
        config.update(input_size=tuple(shape), **({"mean": tuple(mean)} if mean else {}),
                      **({"std": tuple(std)} if std else {}))
        for key in ("mean", "std"):
            if len(config[key]) != shape[0]:
                raise FactnetError(f"the model takes {shape[0]}-channel images but its data config's {key} has "
                                   f"{len(config[key])} values: pass --mean and --std")
        self.shape, self.config = tuple(shape), config
        self.mode = "L" if shape[0] == 1 else "RGB"
        self.transform = create_transform(**config, is_training=False)

    def __call__(self, data: bytes, limits: Limits) -> Tensor:
        """(C, H, W) float32 of a PNG or JPEG file's bytes."""
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # larger: DecompressionBombError, refused below
        try:
            image = Image.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise RequestError(415, f"the image is {image.format}; send a PNG or JPEG file")
            if image.mode not in IMAGE_MODES:
                raise RequestError(415, f"images of mode {image.mode} are not taken; send {', '.join(IMAGE_MODES)}")
            if min(image.size) < limits.min_image_side:
                raise RequestError(422, f"the image is {image.size[0]}x{image.size[1]} pixels; each side needs at "
                                        f"least {limits.min_image_side}")
            image = image.convert(self.mode)  # decodes: a truncated file fails here
        except Image.DecompressionBombError:
            raise RequestError(413, f"the image has more than {limits.max_image_pixels:,} pixels") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise RequestError(400, f"the image cannot be decoded as PNG or JPEG: {error}") from None
        return self.transform(image)


def read_query(body: bytes, *, shape: tuple[int, ...], classes: int,
               preprocess: Preprocess | None, limits: Limits, form: dict[str, Any] | None = None) -> Query:
    """A request body into a `Query`; a `RequestError` (400, 413, 415, 422) for anything else. The body is JSON
    unless ``form`` holds the fields of a ``multipart/form-data`` body, already parsed (`read_form`)."""
    if form is not None:
        unknown = sorted(set(form) - set(FORM_FIELDS))
        if unknown:
            raise RequestError(400, f"unknown form field(s) {unknown}; send {list(FORM_FIELDS)}")
        if not isinstance(form.get("file"), bytes):
            raise RequestError(400, "a multipart request needs a 'file' part holding the image")
        fields: dict[str, Any] = {"user": form.get("user"), "image": form["file"]}
        if "top_k" in form:
            fields["top_k"] = _form_int(form["top_k"])
    else:  # JSON whatever the type says (curl -d sends application/x-www-form-urlencoded)
        fields = _json_object(body)
    user = fields.get("user")
    if user is not None and not (isinstance(user, str) and USER.fullmatch(user)):
        raise RequestError(400, f"'user' must be null or a plain adapter name (letters, digits, '_', '.', '-'; "
                                f"no path), got {user!r}"[:300])
    top_k = fields.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= classes:
        raise RequestError(400, f"'top_k' must be a whole number from 1 to {classes}, got {top_k!r}"[:300])
    if ("input" in fields) == ("image" in fields):
        raise RequestError(400, "send one of 'input' (one sample as nested lists of numbers) or 'image'")
    if "image" in fields:
        if preprocess is None:
            raise RequestError(400, f"this server takes 'input' only: its model's input shape {list(shape)} is not "
                                    "an image it can preprocess")
        x = preprocess(_image_bytes(fields["image"]), limits)
    else:
        x = _input_tensor(fields["input"], shape)
    return Query(user, x, top_k)


def _json_object(body: bytes) -> dict[str, Any]:
    def refuse_constant(name: str) -> Any:
        raise RequestError(400, f"the request holds {name}: only finite numbers are taken")

    try:
        value = json.loads(body, parse_constant=refuse_constant)
    except RecursionError:
        raise RequestError(400, "the request's JSON is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the request is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise RequestError(400, 'the request must be a JSON object {"user": NAME or null, "input": [...] or '
                                '"image": "<base64>", "top_k": 5}')
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown[:5]}; a request has {list(FIELDS)}"[:300])
    return value


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise RequestError(400, "'image' must be a string: the base64 of a PNG or JPEG file")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'image' is not valid base64") from None


def _input_tensor(values: Any, shape: tuple[int, ...]) -> Tensor:
    """Nested lists of numbers (not booleans) of ``shape``, all finite."""
    stack, depth = [(values, 0)], len(shape)
    while stack:  # the types and the nesting, iteratively (a deep list is refused here, not by recursion)
        value, level = stack.pop()
        if level < depth:
            if not isinstance(value, list):
                raise RequestError(400, f"'input' must be nested lists of numbers of shape {list(shape)}")
            if len(value) != shape[level]:
                raise RequestError(400, f"'input' has {len(value)} entries at depth {level}, expected "
                                        f"{shape[level]} (shape {list(shape)})")
            stack.extend((item, level + 1) for item in value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(400, f"'input' holds {type(value).__name__} values; it must be numbers of shape "
                                    f"{list(shape)}")
        elif not math.isfinite(value):
            raise RequestError(400, "'input' holds a number that is not finite")
    return torch.tensor(values, dtype=torch.float32)


def _form_int(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value  # refused with the message for a bad top_k


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The body from ``chunks``; 413 before reading it when ``Content-Length`` (``declared``) is over ``limit``,
    and as soon as the bytes read pass it."""
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise RequestError(413, f"the request has {int(declared):,} bytes; at most {limit:,} are taken")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request has more than {limit:,} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def read_form(headers: Any, body: bytes) -> dict[str, Any]:
    """The fields of a ``multipart/form-data`` body: strings, and the ``file`` part's bytes."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, once(), max_files=1, max_fields=len(FORM_FIELDS)).parse()
    except (MultiPartException, ValueError, KeyError) as error:
        raise RequestError(400, f"the multipart body cannot be read: {error}") from None
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in fields:
            raise RequestError(400, f"the form field {key!r} is given twice")
        fields[key] = await value.read() if hasattr(value, "read") else value
    return fields


@dataclass
class Endpoint:
    """What the routes answer from: the sample shape, the classes and their names, the preprocessing, a health
    report and ``answer`` (a query's logits, batched by the caller; a `FactnetError` for a user not served)."""

    shape: tuple[int, ...]
    classes: int
    names: Sequence[str] | None
    preprocess: Preprocess | None
    limits: Limits
    refused: Callable[[], dict[str, str]]  # user -> why their file was refused
    health: Callable[[], dict[str, Any]]
    answer: Callable[[str | None, Tensor], Awaitable[Tensor | FactnetError]]

    async def predict(self, body: bytes, form: dict[str, Any] | None) -> tuple[int, dict]:
        """(HTTP status, JSON answer) of one request."""
        try:
            query = read_query(body, shape=self.shape, classes=self.classes,
                               preprocess=self.preprocess, limits=self.limits, form=form)
        except RequestError as error:
            return error.status, {"error": str(error)}
        why = self.refused().get(query.user) if query.user is not None else None
        if why is not None:
            return 422, {"error": why}
        logits = await self.answer(query.user, query.x)
        if isinstance(logits, FactnetError):
            return 404, {"error": str(logits)}
        scores = logits.float().softmax(-1)
        top = scores.topk(query.top_k)
        return 200, {"user": query.user, "label": int(logits.argmax()), "logits": logits.tolist(),
                     "top_k": [{"label": int(i), "name": self.names[i] if self.names else str(int(i)),
                                "score": float(p)} for p, i in zip(top.values, top.indices)]}


# the request forms /docs shows for POST /predict (its body is read by hand: NaN, depth and size are checked first)
PREDICT_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "user": {"type": "string", "nullable": True}, "input": {"type": "array", "items": {}},
        "image": {"type": "string", "format": "byte"}, "top_k": {"type": "integer", "minimum": 1}}}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "user": {"type": "string"}, "top_k": {"type": "integer"}}}}}}}
PREDICT_SUMMARY = "One user's answer: label, logits, top_k"
HEALTH_SUMMARY = "The served adapters, refused files, input shape and batching"


def new_api() -> Any:
    """An empty FastAPI app titled for factnet serve (the routes: `make_api`, or the Ray deployment's methods)."""
    from fastapi import FastAPI

    return FastAPI(title="factnet serve", description="One backbone, many users' FacT adapters, mixed batches.")


async def predict_response(endpoint: Endpoint, request: Any) -> Any:
    """``POST /predict``'s JSON response to a Starlette ``request``."""
    from fastapi.responses import JSONResponse

    content_type = request.headers.get("content-type", "")
    try:
        body = await read_body(request.stream(), request.headers.get("content-length"), endpoint.limits.max_body_bytes)
        multipart = content_type.split(";")[0].strip().lower() == "multipart/form-data"
        form = await read_form(request.headers, body) if multipart else None
    except RequestError as error:
        return JSONResponse({"error": str(error)}, status_code=error.status)
    status, answer = await endpoint.predict(body, form)
    return JSONResponse(answer, status_code=status)


def health_response(endpoint: Endpoint) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(endpoint.health())


def make_api(endpoint: Endpoint) -> Any:
    """A FastAPI app answering from ``endpoint``: ``POST /predict``, ``GET /health`` (``/docs`` lists them); the
    Ray deployment declares the same routes on its class."""
    from fastapi import Request

    api = new_api()

    @api.post("/predict", openapi_extra=PREDICT_DOC, summary=PREDICT_SUMMARY)
    async def predict(request: Request) -> Any:
        return await predict_response(endpoint, request)

    @api.get("/health", summary=HEALTH_SUMMARY)
    async def health() -> Any:
        return health_response(endpoint)

    return api
