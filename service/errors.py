"""Domain errors, raised deep in the service and free of any protocol: each door (``service.http`` for REST and
the Open Inference Protocol over HTTP) maps them to its own status codes and body shape in one table.

Each error carries a short, fixed message, safe to show a client: it never holds internals.
"""

from __future__ import annotations


class ServiceError(Exception):
    detail = "internal error"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.detail)
        if detail is not None:
            self.detail = detail

    def about(self, what: str) -> ServiceError:
        """The same error, its message prefixed with what it is about (``"image 2 of 3: ..."``)."""
        self.detail = f"{what}: {self.detail}"
        return self


class EmptyBody(ServiceError):
    detail = "empty body"


class InvalidImage(ServiceError):
    detail = "could not decode image"


class NoImages(ServiceError):
    detail = "multipart body has no file parts"


class InvalidMultipart(ServiceError):
    detail = "malformed multipart body"


class InvalidInferenceRequest(ServiceError):
    detail = "invalid inference request"  # raised with a message naming the tensor and the fault


class Unauthorized(ServiceError):
    detail = "missing or invalid API key"


class AdminDisabled(ServiceError):
    detail = "admin endpoints are off: set RESNET_API_KEYS to enable them"


class UnknownModel(ServiceError):
    detail = "unknown model"


class BodyTimeout(ServiceError):
    detail = "request body not received in time"


class ReloadFailed(ServiceError):
    detail = "reload failed; the previous model is still serving"


class OverLimit(ServiceError):
    """A request past a limit: the message names the limit and the setting that raises it."""

    limit_text = "limit {}"

    def __init__(self, limit: int) -> None:
        super().__init__(f"{self.detail}: {self.limit_text.format(limit)}")


class PayloadTooLarge(OverLimit):
    detail = "body too large"
    limit_text = "limit {} bytes (RESNET_MAX_UPLOAD_BYTES)"


class ImageTooLarge(OverLimit):
    detail = "image has too many pixels"
    limit_text = "limit {} (width x height, RESNET_MAX_IMAGE_PIXELS)"


class TooManyImages(OverLimit):
    detail = "too many images in one request"
    limit_text = "limit {} (RESNET_MAX_BATCH_IMAGES)"


class UnsupportedMediaType(ServiceError):
    detail = "unsupported content type: send image/*, application/octet-stream or multipart/form-data"


class UnsupportedContentEncoding(ServiceError):
    detail = "unsupported Content-Encoding: send gzip, deflate or identity"


class MalformedEncoding(ServiceError):
    detail = "the body does not inflate: malformed or truncated gzip/deflate data"


class QueueFull(ServiceError):
    detail = "server busy: inference queue is full"

    def __init__(self, retry_after_s: float = 1.0) -> None:
        super().__init__()
        self.retry_after_s = retry_after_s  # when the queue should have room again


class ModelNotReady(ServiceError):
    detail = "model not ready"


class ModelLoadFailed(ModelNotReady):
    """The load failed: the reason is the one ``/health/ready`` gives (a ``ModelLoadError``'s message)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"model failed to load: {reason}")


class DeadlineExceeded(ServiceError):
    detail = "request timed out"


class ClientGone(ServiceError):
    detail = "client closed request"  # nobody is left to read it


class InferenceFailed(ServiceError):
    detail = "inference failed"


class ModelLoadError(RuntimeError):
    """The model file cannot be served; the message names the cause. Not a request error: it keeps the service
    from becoming ready."""
