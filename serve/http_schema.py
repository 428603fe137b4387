"""What the service's OpenAPI document says: request and response bodies, error answers, and the limits
the operations enforce beyond the pydantic models (rows, latent size, value ranges, parameter maxima).
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, Field, StrictFloat

from serve.middleware import PROTECTED_PREFIXES
from serve.ops import MAX_ABS_LATENT


class SampleRequest(BaseModel):
    n: int = Field(1, ge=1, description="number of images")
    seed: int | None = Field(None, ge=0, lt=2**63, description="noise seed; omitted: a random one, echoed back")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="scale of z ~ N(0, I)")


class DecodeRequest(BaseModel):
    # Strict: JSON numbers only, as /v1/encode takes them (lax floats read `true` as 1.0 and "1.5" as 1.5).
    z: list[list[StrictFloat]] = Field(..., description="latents (B, latent_dim)")


class ImagesResponse(BaseModel):
    images: list = Field(..., description="(B, C, H, W) pixel means in [0, 1]")
    shape: list[int]
    seed: int | None = None


class EncodeResponse(BaseModel):
    mean: list[list[float]]
    logvar: list[list[float]]
    z: list[list[float]] | None = Field(None, description="z ~ q(z|x) when sample=true")
    seed: int | None = None


class PixelMap(BaseModel):
    """Where in one image its score comes from: -log p(x|z) per pixel (nats, summed over channels, averaged over
    the z samples), the ELBO's reconstruction term pixel by pixel."""

    max_nats: float = Field(..., description="the map's largest value: white in the PNG")
    sum_nats: float = Field(..., description="the whole map: the image's reconstruction term")
    png: str | None = Field(None, description="?maps=png: base64 PNG (H x W, RGB), a 'hot' colour scale from "
                                              "0 nats (black) through red and yellow to max_nats (white)")
    nats: list[list[float]] | None = Field(None, description="?maps=json: the values, (H, W)")


class ScoreResponse(BaseModel):
    """Scores, and with ?maps= where in each image they come from."""

    scores: list[float] = Field(..., description="per image, higher = more anomalous: for kind 'likelihood' the "
                                                 "negative ELBO (or IWAE bound) in nats, for a combination a sum of "
                                                 "z-scores standardised on the model's validation images")
    kind: str = Field("likelihood", description="the score computed (?kind=auto resolved)")
    warning: str | None = Field(None, description="why ?kind=auto fell back to the likelihood")
    method: str
    complexity: str = Field("none", description="png: the PNG code length was subtracted (input-complexity score)")
    num_samples: int
    seed: int
    threshold: float | None = None
    is_anomaly: list[bool] | None = None
    maps: list[PixelMap] | None = Field(None, description="with ?maps=png or ?maps=json: one per image, in order")


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every error the service answers: a message, or (for a body that fails its schema) one entry per problem."""

    detail: str | list[ValidationIssue]


class StatusResponse(BaseModel):
    status: str


ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "malformed body (not JSON, JSON nested too deep, a broken multipart body)",
    401: "missing or wrong bearer token (when $VAE_SERVE_TOKEN is set)",
    413: "body, image or batch past a limit",
    415: "unsupported Content-Type",
    422: "the body or a parameter is not what the endpoint takes",
    500: "the model produced NaN/Inf or pixels outside [0, 1] for this input",
    503: "server busy (Retry-After says when to retry)",
}.items()}
PNG_ANSWER = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                    "description": "JSON, or a PNG image or grid with ?format=png"}}



def _exactly(item: dict, count: int) -> dict:
    return {"type": "array", "items": item, "minItems": count, "maxItems": count}


def image_body(image_shape: tuple[int, int, int], min_images: int, max_images: int) -> dict:
    """The documented request body of an image endpoint (`openapi_extra`): JSON arrays of the model's exact
    shape, PNG uploads, or one raw PNG."""
    channels, height, width = image_shape
    pixel = {"type": "number", "minimum": 0.0, "maximum": 1.0}
    images = {"type": "array", "items": _exactly(_exactly(_exactly(pixel, width), height), channels),
              "minItems": min_images, "maxItems": max_images,
              "description": f"(B, {channels}, {height}, {width}) floats in [0, 1]"}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {"images": images}}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
    }}}


def document_limits(app: FastAPI, latent_dim: int, max_items: int, max_score_samples: int, token: bool) -> None:
    """Make /openapi.json and /docs state what the handlers enforce beyond the pydantic models: the limits
    (rows, latent size, value ranges, parameter maxima) and the token requirement (the middleware enforces it)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            models = schema["components"]["schemas"]
            latent_row = _exactly({"type": "number", "minimum": -MAX_ABS_LATENT, "maximum": MAX_ABS_LATENT},
                                  latent_dim)
            models["DecodeRequest"]["properties"]["z"].update(items=latent_row, minItems=1, maxItems=max_items)
            models["SampleRequest"]["properties"]["n"]["maximum"] = max_items
            maxima = {"steps": max_items, "num_samples": max_score_samples}
            for operations in schema["paths"].values():
                for operation in operations.values():
                    for parameter in operation.get("parameters", []):
                        if parameter["name"] in maxima:
                            parameter["schema"]["maximum"] = maxima[parameter["name"]]
            if token:
                schema["components"].setdefault("securitySchemes", {})["bearer"] = {
                    "type": "http", "scheme": "bearer", "description": "$VAE_SERVE_TOKEN"}
                for path, operations in schema["paths"].items():
                    if path.startswith(PROTECTED_PREFIXES):
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
