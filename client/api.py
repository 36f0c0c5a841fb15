"""A small synchronous client for the `sparrow` ensemble (video bytes + prompt -> text, token ids, stats)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL = "sparrow"


class SparrowServerError(RuntimeError):
    """The server refused or failed the request; `status` is the gRPC status name when known."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


def _bytes_input(name: str, value: bytes) -> grpcclient.InferInput:
    x = grpcclient.InferInput(name, [1], "BYTES")
    x.set_data_from_numpy(np.array([value], dtype=np.object_))
    return x


def _int_input(name: str, value: int) -> grpcclient.InferInput:
    x = grpcclient.InferInput(name, [1], "INT32")
    x.set_data_from_numpy(np.array([value], dtype=np.int32))
    return x


class SparrowClient:
    def __init__(self, url: str = "localhost:8001", model: str = MODEL, timeout_s: float | None = 600.0):
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self._client = grpcclient.InferenceServerClient(url)

    def ready(self) -> bool:
        try:
            return self._client.is_server_ready() and self._client.is_model_ready(self.model)
        except InferenceServerException:
            return False

    def infer(self, video: bytes | str | Path, prompt: str, strategy: str = "sparrow", max_tokens: int = 64,
              num_frames: int = 0) -> Answer:
        """Answer `prompt` about `video` (a file path or the file's bytes); num_frames 0 keeps every frame."""
        data = video if isinstance(video, (bytes, bytearray)) else Path(video).read_bytes()
        inputs = [_bytes_input("video", bytes(data)), _bytes_input("prompt", prompt.encode("utf-8")),
                  _bytes_input("strategy", strategy.encode("utf-8")), _int_input("max_tokens", max_tokens),
                  _int_input("num_frames", num_frames)]
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("text", "token_ids", "stats")]
        try:
            res = self._client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise SparrowServerError(e.message(), e.status()) from e
        return Answer(text=res.as_numpy("text").reshape(-1)[0].decode("utf-8"),
                      token_ids=[int(t) for t in res.as_numpy("token_ids").reshape(-1)],
                      stats=json.loads(res.as_numpy("stats").reshape(-1)[0]))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "SparrowClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
