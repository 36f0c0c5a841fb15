"""A typed client for the `sparrow` ensemble over gRPC, sync (`SparrowClient`) and asyncio
(`AsyncSparrowClient`), on `tritonclient.grpc`. Imports no torch.

The ensemble streams (its LLM model is decoupled), so every call goes over Triton's gRPC streaming API:
`stream(...)` yields the answer's text pieces as they are decoded, then one `Answer`; `infer(...)` runs the
same stream and returns the `Answer`. Closing a stream early (leaving the loop) cancels the request on
the server, which stops decoding.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.utils import InferenceServerException

MODEL = "sparrow"
MODELS = ("preprocessing", "vision_encoder", "sparrow_llm", "postprocessing", "sparrow")


# ---- errors -------------------------------------------------------------------------------------

class SparrowServerError(RuntimeError):
    """The server refused or failed the request; `status` is the gRPC status name when known."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class SparrowInvalidRequest(SparrowServerError):
    """Bad input (INVALID_ARGUMENT), an unknown model (NOT_FOUND) or a call the model does not take."""


class SparrowUnavailable(SparrowServerError):
    """The server cannot be reached or is not serving (UNAVAILABLE), after every retry."""


class SparrowTimeout(SparrowServerError):
    """The answer did not arrive within the client's timeout (DEADLINE_EXCEEDED)."""


# Over a gRPC stream Triton sends only an error's message, no status code. The server's own refusals
# start with this marker (sparrow.serving.RequestError); Triton core's request validation (2.51) words
# its refusals as below.
_INVALID_MARKERS = ("invalid request:", "unexpected shape for input", "data-type is", "unexpected inference input",
                    "is not found", "expected to have", "missing", "does not support")
_BY_STATUS = {"INVALID_ARGUMENT": SparrowInvalidRequest, "NOT_FOUND": SparrowInvalidRequest,
              "UNIMPLEMENTED": SparrowInvalidRequest, "UNAVAILABLE": SparrowUnavailable,
              "DEADLINE_EXCEEDED": SparrowTimeout}


def _typed(message: str, code: str | None) -> SparrowServerError:
    if code is None and any(m in message for m in _INVALID_MARKERS):
        code = "INVALID_ARGUMENT"
    return _BY_STATUS.get(code, SparrowServerError)(message, code)


def _gave_up(err: SparrowServerError, conn: "Connection", retry: "RetryPolicy") -> SparrowServerError:
    """The error to raise: an UNAVAILABLE one says where and how often it was tried."""
    if isinstance(err, SparrowUnavailable) and retry.attempts > 1:
        return SparrowUnavailable(f"server {conn.url} unavailable after {retry.attempts} attempts: {err}", err.status)
    return err


def _error(e: InferenceServerException | grpc.RpcError) -> SparrowServerError:
    """The typed exception for a tritonclient error or a bare gRPC one (the asyncio stream raises those)."""
    if isinstance(e, grpc.RpcError):
        return _typed(e.details() or str(e), e.code().name)
    status = e.status()  # "StatusCode.UNAVAILABLE" for RPC failures; None for an error inside a stream
    return _typed(e.message() or str(e), status.rsplit(".", 1)[-1] if status else None)


# ---- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a call that fails with UNAVAILABLE before anything came back (server down, restarting,
    or not ready yet): `attempts` tries in all, waiting initial, initial*multiplier, ... up to max."""
    attempts: int = 4
    initial_backoff_s: float = 0.25
    multiplier: float = 2.0
    max_backoff_s: float = 4.0

    def backoffs(self) -> Iterator[float]:
        """The wait before each retry (attempts - 1 of them)."""
        delay = self.initial_backoff_s
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_backoff_s)
            delay *= self.multiplier


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the server. TLS: `ssl=True` with PEM file paths, passed to tritonclient."""
    url: str = "localhost:8001"
    ssl: bool = False
    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None
    headers: dict[str, str] | None = None  # sent with every call (e.g. authorization for a gateway)

    def kwargs(self) -> dict:
        return dict(ssl=self.ssl, root_certificates=self.root_certificates, private_key=self.private_key,
                    certificate_chain=self.certificate_chain)


# ---- results ------------------------------------------------------------------------------------

@dataclass
class Answer:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)  # the server's: tokens/s, mean accepted length, draft/verify ms
    first_piece_s: float | None = None  # client side: request sent -> first text piece received
    total_s: float = 0.0  # client side: request sent -> answer complete


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    version: str
    models: dict[str, bool]  # model name -> READY


@dataclass
class _Assembler:
    """Collects a stream's responses into pieces and the final `Answer`."""
    t0: float = field(default_factory=time.perf_counter)
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    first_piece_s: float | None = None
    done: bool = False  # the final response arrived
    ended: bool = False  # the server is through with the request (done, or it answered with an error)

    def take(self, result, error) -> str | None:
        """One stream event: its text piece (None or "" when it has none); the server's error is raised."""
        if error is not None:
            self.ended = True
            raise _error(error) from error
        piece, self.done = self._add(result)
        self.ended = self.done
        return piece

    def _add(self, result) -> tuple[str | None, bool]:
        """(the response's text piece or None for the empty final response, whether it is the last)."""
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        if not response.outputs:
            return None, final
        piece = result.as_numpy("text").reshape(-1)[0].decode("utf-8")
        self.token_ids += [int(t) for t in result.as_numpy("token_ids").reshape(-1)]
        stats = result.as_numpy("stats").reshape(-1)[0]
        if stats:
            self.stats = json.loads(stats)
        if piece and self.first_piece_s is None:
            self.first_piece_s = time.perf_counter() - self.t0
        self.pieces.append(piece)
        return piece, final

    def answer(self) -> Answer:
        return Answer("".join(self.pieces), self.token_ids, self.stats, self.first_piece_s,
                      time.perf_counter() - self.t0)


def _inputs(video: bytes | str | Path | None, frames: np.ndarray | None, prompt: str, max_tokens: int,
            temperature: float, seed: int, num_frames: int, speculative: bool) -> list[grpcclient.InferInput]:
    """The ensemble's inputs. The server checks them (exactly one of video / frames, sizes, ...)."""
    def tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
        x = grpcclient.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        return x

    out = [tensor("prompt", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES"),
           tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
           tensor("temperature", np.array([temperature], dtype=np.float32), "FP32"),
           tensor("seed", np.array([seed], dtype=np.int64), "INT64"),
           tensor("num_frames", np.array([num_frames], dtype=np.int32), "INT32"),
           tensor("speculative", np.array([speculative], dtype=bool), "BOOL")]
    if video is not None:
        data = bytes(video) if isinstance(video, (bytes, bytearray)) else Path(video).read_bytes()
        out.append(tensor("video", np.array([data], dtype=np.object_), "BYTES"))
    if frames is not None:
        frames = np.ascontiguousarray(frames)  # uint8 [N, H, W, 3]; another dtype is refused by the server
        out.append(tensor("frames", frames, grpcclient.np_to_triton_dtype(frames.dtype)))
    return out


# ---- the sync client ----------------------------------------------------------------------------

class SparrowClient:
    """Sync client. Thread-safe: each stream runs on its own tritonclient client, kept in a pool (a
    tritonclient client holds one stream at a time)."""

    def __init__(self, url: str = "localhost:8001", model: str = MODEL, timeout_s: float | None = 600.0,
                 retry: RetryPolicy = RetryPolicy(), connection: Connection | None = None):
        self.conn = connection or Connection(url)
        self.model, self.timeout_s, self.retry = model, timeout_s, retry
        self._idle: queue.SimpleQueue = queue.SimpleQueue()

    def _client(self) -> grpcclient.InferenceServerClient:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return grpcclient.InferenceServerClient(self.conn.url, **self.conn.kwargs())

    def _call(self, fn):
        """A unary call, retried on UNAVAILABLE."""
        for wait in [*self.retry.backoffs(), None]:
            client = self._client()
            try:
                out = fn(client)
            except InferenceServerException as e:
                client.close()
                err = _error(e)
                if not isinstance(err, SparrowUnavailable) or wait is None:
                    raise _gave_up(err, self.conn, self.retry) from e
                time.sleep(wait)
                continue
            self._idle.put(client)
            return out

    def ready(self) -> bool:
        """Server and ensemble ready (one try, no retries)."""
        client = self._client()
        try:
            ok = client.is_server_ready(headers=self.conn.headers) and \
                client.is_model_ready(self.model, headers=self.conn.headers)
        except InferenceServerException:
            client.close()
            return False
        self._idle.put(client)
        return ok

    def health(self) -> Health:
        def fn(c):
            index = c.get_model_repository_index(headers=self.conn.headers, client_timeout=self.timeout_s)
            return Health(c.is_server_live(headers=self.conn.headers), c.is_server_ready(headers=self.conn.headers),
                          c.get_server_metadata(headers=self.conn.headers).version,
                          {m.name: m.state == "READY" for m in index.models})
        return self._call(fn)

    def stream(self, video: bytes | str | Path | None = None, prompt: str = "", *, frames: np.ndarray | None = None,
               max_tokens: int = 64, temperature: float = 0.0, seed: int = 0, num_frames: int = 0,
               speculative: bool = True) -> Iterator[str | Answer]:
        """Yield the answer's text pieces as they arrive, then the `Answer`. `video`: a file path or the
        file's bytes; or `frames`: uint8 `[N, H, W, 3]`. num_frames 0 keeps every frame; speculative=False
        decodes plain autoregressively; temperature > 0 samples, seeded by `seed`."""
        inputs = _inputs(video, frames, prompt, max_tokens, temperature, seed, num_frames, speculative)
        request_id = uuid.uuid4().hex  # unique per stream: the server cancels by request id
        for wait in [*self.retry.backoffs(), None]:
            client, got = self._client(), queue.SimpleQueue()
            client.start_stream(lambda result, error: got.put((result, error)), stream_timeout=self.timeout_s,
                                headers=self.conn.headers)
            acc = _Assembler()
            try:
                try:
                    client.async_stream_infer(self.model, inputs, request_id=request_id,
                                              enable_empty_final_response=True)
                except InferenceServerException:
                    pass  # the stream failed already (server down): tritonclient passes its error to the callback
                while not acc.done:
                    try:  # the stream's own deadline ends it first; this only guards a silent stream
                        result, error = got.get(timeout=None if self.timeout_s is None else self.timeout_s + 10)
                    except queue.Empty:
                        raise SparrowTimeout(f"no response within {self.timeout_s} s", "DEADLINE_EXCEEDED") from None
                    piece = acc.take(result, error)
                    if piece:
                        yield piece
            except SparrowUnavailable as err:
                if acc.pieces:  # text already went out: the request cannot be replayed
                    raise
                if wait is None:
                    raise _gave_up(err, self.conn, self.retry) from err
            finally:
                # a stream left early (the caller stopped reading, or a timeout) cancels the request; one the
                # server has ended is closed without cancelling: cancelling a stream after Triton refused its
                # request (e.g. a wrong dtype) keeps the ensemble from unloading at shutdown (2.51)
                client.stop_stream(cancel_requests=not acc.ended)
                if acc.done:
                    self._idle.put(client)
                else:
                    client.close()
            if acc.done:
                yield acc.answer()
                return
            time.sleep(wait)

    def infer(self, video: bytes | str | Path | None = None, prompt: str = "", **kw) -> Answer:
        """The whole answer (the same stream, joined). Keyword arguments as `stream`."""
        for item in self.stream(video, prompt, **kw):
            pass
        return item

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def __enter__(self) -> "SparrowClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the asyncio client -------------------------------------------------------------------------

async def _drain(responses, timeout_s: float = 10.0) -> None:
    """Read a stream the server is through with to its end, so the RPC finishes cleanly. Left open, it is
    cancelled when the channel closes, and a stream cancelled after its request completed keeps Triton
    2.51 from ever unloading the ensemble (seen: shutdown then waits its whole exit timeout)."""
    async def rest():
        async for _ in responses:
            pass

    try:
        await asyncio.wait_for(rest(), timeout_s)
    except (asyncio.TimeoutError, grpc.RpcError, InferenceServerException):
        responses.cancel()


class AsyncSparrowClient:
    """asyncio client with the surface of `SparrowClient` (coroutines and an async generator). One
    tritonclient.grpc.aio client carries any number of concurrent streams."""

    def __init__(self, url: str = "localhost:8001", model: str = MODEL, timeout_s: float | None = 600.0,
                 retry: RetryPolicy = RetryPolicy(), connection: Connection | None = None):
        self.conn = connection or Connection(url)
        self.model, self.timeout_s, self.retry = model, timeout_s, retry
        self._client = aiogrpcclient.InferenceServerClient(self.conn.url, **self.conn.kwargs())

    async def _call(self, fn):
        """A unary call, retried on UNAVAILABLE."""
        for wait in [*self.retry.backoffs(), None]:
            try:
                return await fn(self._client)
            except InferenceServerException as e:
                err = _error(e)
                if not isinstance(err, SparrowUnavailable) or wait is None:
                    raise _gave_up(err, self.conn, self.retry) from e
            await asyncio.sleep(wait)

    async def ready(self) -> bool:
        try:
            return await self._client.is_server_ready(headers=self.conn.headers) and \
                await self._client.is_model_ready(self.model, headers=self.conn.headers)
        except InferenceServerException:
            return False

    async def health(self) -> Health:
        async def fn(c):
            index = await c.get_model_repository_index(headers=self.conn.headers, client_timeout=self.timeout_s)
            meta = await c.get_server_metadata(headers=self.conn.headers)
            return Health(await c.is_server_live(headers=self.conn.headers),
                          await c.is_server_ready(headers=self.conn.headers), meta.version,
                          {m.name: m.state == "READY" for m in index.models})
        return await self._call(fn)

    async def stream(self, video: bytes | str | Path | None = None, prompt: str = "", *,
                     frames: np.ndarray | None = None, max_tokens: int = 64, temperature: float = 0.0,
                     seed: int = 0, num_frames: int = 0, speculative: bool = True) -> AsyncIterator[str | Answer]:
        """As `SparrowClient.stream`. Leaving the loop early cancels the request once the generator is
        closed: wrap it in `contextlib.aclosing` to close it at once."""
        # the aio client has no enable_empty_final_response argument; this parameter is what it sets
        request = {"model_name": self.model, "request_id": uuid.uuid4().hex,
                   "parameters": {"triton_enable_empty_final_response": True},
                   "inputs": _inputs(video, frames, prompt, max_tokens, temperature, seed, num_frames, speculative)}

        async def one_request():
            yield request

        for wait in [*self.retry.backoffs(), None]:
            responses = self._client.stream_infer(one_request(), stream_timeout=self.timeout_s,
                                                  headers=self.conn.headers)
            acc = _Assembler()
            try:
                async for result, error in responses:
                    piece = acc.take(result, error)
                    if piece:
                        yield piece
                    if acc.done:
                        break
                if not acc.done:
                    raise SparrowServerError("the stream ended before the final response")
            except (InferenceServerException, grpc.RpcError) as e:  # the RPC itself failed (e.g. server down)
                err = _error(e)
                if not isinstance(err, SparrowUnavailable) or acc.pieces:
                    raise err from e
                if wait is None:
                    raise _gave_up(err, self.conn, self.retry) from e
            finally:
                if not acc.ended:
                    responses.cancel()  # left early: cancel the request on the server (see SparrowClient.stream)
                else:
                    await _drain(responses)
            if acc.done:
                yield acc.answer()
                return
            await asyncio.sleep(wait)

    async def infer(self, video: bytes | str | Path | None = None, prompt: str = "", **kw) -> Answer:
        async for item in self.stream(video, prompt, **kw):
            pass
        return item

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncSparrowClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
