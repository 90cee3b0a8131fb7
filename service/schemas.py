"""Response bodies, documented in the OpenAPI schema."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str = Field(examples=["default"])
    version: str = Field(description="first 12 hex digits of the ONNX file's sha256", examples=["3f2a9c0d1e4b"])


class TopK(BaseModel):
    label: str = Field(examples=["7"])
    index: int = Field(examples=[7])
    probability: float = Field(examples=[0.9931])


class Prediction(BaseModel):
    probabilities: list[float] = Field(description="softmax over all classes, in label order; sums to 1")
    top_k: list[TopK] = Field(description="the most probable classes, most probable first")


class PredictResponse(BaseModel):
    model: ModelRef
    provider: str = Field(description="onnxruntime execution provider that ran the batch",
                          examples=["CPUExecutionProvider"])
    predictions: list[Prediction] = Field(description="one per image, in request order")


class Health(BaseModel):
    status: str = Field(examples=["ready"])
    detail: str | None = None


class FitToContent(BaseModel):
    margin: float = Field(description="added on each side, as a fraction of the ink box's longer side")
    threshold: int = Field(description="a pixel is ink when a channel differs from the background by more")


class Preprocessing(BaseModel):
    input_size: list[int] = Field(examples=[[32, 32]])
    colour_mode: str = Field(examples=["L"])
    mean: list[float]
    std: list[float]
    resize: str = Field(description="the Pillow filter of every resize", examples=["bilinear"])
    resize_mode: str = Field(description="stretch, shorter-side-crop or pad", examples=["stretch"])
    crop_fraction: float | None = Field(description="shorter-side-crop: the crop's share of the resized image")
    background: list[int] = Field(description="per channel: under transparency and in padding", examples=[[0]])
    fit_to_content: FitToContent | None = Field(description="drawings: cropped to the ink and centred first")
    jpeg_luma: bool = Field(description="a single-channel model's colour JPEGs are decoded to their luma alone")


class ModelCard(BaseModel):
    name: str
    version: str
    labels: list[str]
    input_name: str
    input_shape: list[int] = Field(description="-1 is the dynamic batch axis", examples=[[-1, 1, 32, 32]])
    preprocessing: Preprocessing
    provider: str
    arch: str | None = None
    val_accuracy: float | None = None
    created_at: str | None = None
    metadata: dict = Field(description="everything in the file's metadata_props, JSON-decoded")


class Error(BaseModel):
    detail: str = Field(examples=["could not decode image"])


class Reloaded(BaseModel):
    status: str = Field(examples=["reloaded"])
    model: ModelRef
    provider: str
