"""Triton serving: request checks used by the model repository (`triton_repo/`), laying out a runnable
copy of that repository, and starting the real `tritonserver` shipped in the `nvidia-pytriton` wheel.

Imports neither torch nor tritonclient at module level: the Python-backend models and `sparrow serve`
both use it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import json

import numpy as np

from .demo.model import DEMO_DRAFTS, DEMO_TARGET_DIR

OUTPUTS_FILE = "sparrow_outputs.json"  # beside the TensorRT-LLM target engine: the hidden layers it outputs

MODELS = ("preprocessing", "vision_encoder", "sparrow_llm", "postprocessing", "sparrow")
ENSEMBLE = "sparrow"


INVALID_REQUEST = "invalid request:"


class RequestError(ValueError):
    """A request the server refuses; the message is sent back to the client as the error.

    Over a gRPC stream Triton forwards only an error's message, not its status code, so every refusal
    starts with INVALID_REQUEST: the client maps that marker to its typed exception."""

    def __init__(self, message: str):
        super().__init__(f"{INVALID_REQUEST} {message}")


class Cancelled(Exception):
    """The client cancelled the request (closed its stream); decoding stops at the next step."""


@dataclass(frozen=True)
class ServeConfig:
    """Values filled into the repository's config.pbtxt parameters (`${name}`). The defaults serve the embedded
    demo pair straight from the package; `from_engines` serves a `sparrow build` output directory."""
    max_video_bytes: int = 64 << 20  # also the limit on raw `frames` bytes
    max_frames: int = 256
    max_prompt_chars: int = 2000
    draft_len: int = 5
    max_len: int = 16384
    max_tokens_limit: int = 256
    default_max_tokens: int = 64  # when a request sends no max_tokens
    target_dir: str = str(DEMO_TARGET_DIR)  # a Hugging Face directory (model, tokenizer, processor config)
    draft_dir: str = str(DEMO_DRAFTS["sparrow"])
    vision_onnx: str = ""  # the vision encoder in ONNX Runtime; "": the target's tower in torch
    window: int = 0  # the draft's window W the build was made for; 0: whatever the draft was trained with
    instances: int = 1  # sparrow_llm instances (each its own KV cache)
    # the TensorRT-LLM target engine directory (`--backend tensorrt_llm`); "": the target runs in torch
    trtllm_engine: str = ""

    @classmethod
    def from_engines(cls, engine_dir: str | Path, **overrides) -> "ServeConfig":
        """The configuration a build directory's manifest.json gives (`serve` block, paths made absolute), after
        re-hashing every artifact it lists; `overrides` (e.g. limits from the command line) win. Raises
        EngineDirError naming the problem: no or unreadable manifest, a build without a draft, an artifact
        missing or modified since the build."""
        from .convert.build import MANIFEST, verify

        root = Path(engine_dir).resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise EngineDirError(f"{root} is not an engine directory: no {MANIFEST} (build one with "
                                 f"`sparrow build --recipe engines/<name>.yaml --out {engine_dir}`)")
        try:
            serve = json.loads(path.read_text())["serve"]
        except (ValueError, KeyError, TypeError) as e:
            raise EngineDirError(f"{path} is not a manifest this version serves ({type(e).__name__}: {e}); "
                                 f"rebuild with `sparrow build`") from None
        if not serve.get("draft"):
            raise EngineDirError(f"{root}: the build has no Sparrow draft (recipe without `draft`); sparrow_llm needs one")
        problems = verify(root)
        if problems:
            raise EngineDirError(f"{root} does not match its manifest (rebuild, or restore the files): "
                                 + "; ".join(problems[:10]))
        values = dict(target_dir=str(root / serve["target"]), draft_dir=str(root / serve["draft"]),
                      vision_onnx=str(root / serve["vision_onnx"]) if serve.get("vision_onnx") else "",
                      window=serve["window"], draft_len=serve["draft_len"], max_len=serve["max_len"],
                      max_frames=serve["max_frames"], instances=serve["instances"])
        return cls(**{**values, **overrides})


class EngineDirError(ValueError):
    """`sparrow serve --engines DIR` cannot serve DIR; the message says why and what to do."""


BACKENDS = ("torch", "tensorrt_llm")


def backend_missing(backend: str, engine_dir: Path | None) -> str | None:
    """None when `backend` can serve here; else what is missing, in words. Checked before the server starts."""
    import importlib.util

    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {list(BACKENDS)}"
    if backend == "torch":
        return None
    if engine_dir is None:
        return "--backend tensorrt_llm serves built engines: give --engines DIR"
    if importlib.util.find_spec("tensorrt_llm") is None:
        return ("--backend tensorrt_llm needs the `tensorrt_llm` Python package (TensorRT-LLM, with TensorRT and "
                "a CUDA GPU), which is not installed here; serve this directory with --backend torch on CPU")
    engines = trtllm_engine_dir(engine_dir)
    if not (engines / OUTPUTS_FILE).is_file():
        return (f"--backend tensorrt_llm needs the TensorRT-LLM target engine {engines} (with {OUTPUTS_FILE}): run "
                f"`bash {Path(engine_dir) / 'build_engines.sh'}` on this GPU host first")
    return None


def trtllm_engine_dir(engine_dir: Path) -> Path:
    """Where `build_engines.sh` writes the TensorRT-LLM target engine inside a build directory."""
    return Path(engine_dir) / "engines" / "target"


# ---- request checks (run inside the Python-backend models) --------------------------------------

def param(model_config: dict, key: str) -> str:
    return model_config["parameters"][key]["string_value"]


def input_array(pb_utils, request, name: str) -> np.ndarray | None:
    """A request's input as numpy; None when an optional input was not sent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def one_string(array: np.ndarray, name: str) -> str:
    """The single BYTES element of a `[1]` input, decoded as UTF-8."""
    if array.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name} is not valid UTF-8: {e}") from e


def one_value(array: np.ndarray | None, name: str, default):
    """The single element of an optional `[1]` input as a Python scalar; `default` when it was not sent."""
    if array is None:
        return default
    if array.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got shape {list(array.shape)}")
    return array.reshape(-1)[0].item()


def check_prompt(prompt: str, max_chars: int) -> str:
    if not prompt.strip():
        raise RequestError("prompt is empty")
    if len(prompt) > max_chars:
        raise RequestError(f"prompt too long: {len(prompt)} characters > {max_chars}")
    return prompt


def check_num_frames(num_frames: int, max_frames: int) -> int:
    if num_frames < 0:
        raise RequestError(f"num_frames must be 0 (all) or positive, got {num_frames}")
    if num_frames > max_frames:
        raise RequestError(f"too many frames: num_frames {num_frames} > {max_frames}")
    return num_frames


def decode_video(video: bytes, num_frames: int, max_bytes: int, max_frames: int) -> np.ndarray:
    """Video bytes -> uint8 `[N, H, W, 3]` exactly as `sparrow.video.decode` does; num_frames 0 keeps all."""
    from .video import VideoError, decode

    if len(video) > max_bytes:
        raise RequestError(f"video too large: {len(video)} bytes > {max_bytes} (oversized request)")
    check_num_frames(num_frames, max_frames)
    try:
        return decode(video, num_frames=num_frames or None, max_frames=max_frames)
    except VideoError as e:
        raise RequestError(f"bad video: {e}") from e


def check_frames(frames: np.ndarray, num_frames: int, max_bytes: int, max_frames: int) -> np.ndarray:
    """Raw uint8 frames `[N, H, W, 3]` (Triton has checked dtype and rank), sampled as `decode` samples."""
    from .video import sample_uniform

    if frames.nbytes > max_bytes:
        raise RequestError(f"frames too large: {frames.nbytes} bytes > {max_bytes} (oversized request)")
    if min(frames.shape[:3]) < 1:
        raise RequestError(f"frames must have shape [N>=1, H>=1, W>=1, 3], got {list(frames.shape)}")
    if len(frames) > max_frames:
        raise RequestError(f"too many frames: {len(frames)} > {max_frames}; send fewer")
    check_num_frames(num_frames, max_frames)
    return sample_uniform(frames, num_frames) if num_frames else frames


def check_max_tokens(max_tokens: int, limit: int) -> int:
    if not 1 <= max_tokens <= limit:
        raise RequestError(f"max_tokens must lie in [1, {limit}], got {max_tokens}")
    return max_tokens


def check_temperature(temperature: float) -> float:
    if not 0.0 <= temperature <= 10.0:  # also refuses NaN
        raise RequestError(f"temperature must lie in [0, 10], got {temperature}")
    return temperature


def text_piece(decode, prior: list[int], new: list[int], final: bool) -> str:
    """Incremental detokenisation, stateless: the text `new` adds after `prior` (token ids).

    `decode(ids)` is the full answer's decode (`sparrow.generate`: skip special tokens, strip). Decoding
    the whole prefix, not the new tokens alone, keeps what tokenizers do across token boundaries (spaces
    between words, SentencePiece's leading-space marker, multi-byte characters split over byte tokens).
    A trailing U+FFFD (an incomplete UTF-8 character) is held back until the bytes that finish it arrive
    (or the stream ends), so the pieces of a stream concatenate to exactly `decode(all ids)`.
    """
    before = decode(prior).rstrip("\ufffd")
    after = decode(prior + new)
    if not final:
        after = after.rstrip("\ufffd")
    if after.startswith(before):
        return after[len(before):]
    # a tokenizer whose decode rewrites earlier text (e.g. clean-up of spaces before punctuation):
    # what was sent cannot be taken back, so send what follows the common prefix
    common = len(os.path.commonprefix([before, after]))
    return after[common:]


class CancelFlags:
    """Carries a client's cancellation from postprocessing to the running sparrow_llm, by request id.

    Triton cancels an ensemble's steps only when it schedules them (core ensemble_scheduler.cc, in 2.51 and
    still on core's main branch): the in-flight decoupled sparrow_llm request never reports `is_cancelled()`, but every
    postprocessing request scheduled after the cancellation does, and composing requests carry the
    ensemble request's id. So postprocessing marks the id here (an empty file in a directory both models
    share) and sparrow_llm looks for the mark between draft/verify steps. Needs a request id that is
    unique per stream (sparrow.client sets one); without an id a cancelled stream runs to its end.
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, request_id: str) -> Path:
        import hashlib  # ids are client strings: hash them into safe file names

        return self.dir / hashlib.sha1(request_id.encode("utf-8")).hexdigest()

    def mark(self, request_id: str) -> None:
        if request_id:
            self._path(request_id).touch()

    def is_marked(self, request_id: str) -> bool:
        return bool(request_id) and self._path(request_id).exists()

    def clear(self, request_id: str, older_than_s: float = 60.0) -> None:
        """Drop this id's mark, and any mark older than `older_than_s` (one that arrived after its request
        had ended), so marks do not pile up."""
        if request_id:
            self._path(request_id).unlink(missing_ok=True)
        now = time.time()
        for f in self.dir.iterdir():
            try:
                if now - f.stat().st_mtime > older_than_s:
                    f.unlink()
            except FileNotFoundError:  # the other model removed it first
                pass


class Responder:
    """Runs one request's handler so that a refused request (bad input), a cancelled one or a failure
    ends that request, never the model. Counts requests by model and outcome on Triton's metrics port."""

    OUTCOMES = ("ok", "refused", "cancelled", "failed")

    def __init__(self, pb_utils, model: str):
        self.pb = pb_utils
        self.family = pb_utils.MetricFamily(
            name="sparrow_requests_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Requests by model and outcome (ok; refused: bad input; cancelled: by the client; "
                        "failed: server-side error)")
        self.count = {o: self.family.Metric(labels={"model": model, "outcome": o}) for o in self.OUTCOMES}

    def _error(self, e: Exception) -> tuple[object, str]:
        """(error response, outcome) for an exception out of a handler. A cancelled request still gets a
        response: an ensemble waits for every step's response (or final flag) before it completes."""
        pb = self.pb
        if isinstance(e, RequestError):
            return pb.InferenceResponse(error=pb.TritonError(str(e), pb.TritonError.INVALID_ARG)), "refused"
        if isinstance(e, Cancelled):
            return pb.InferenceResponse(error=pb.TritonError("cancelled by the client", pb.TritonError.CANCELLED)), \
                "cancelled"
        return pb.InferenceResponse(error=pb.TritonError(f"{type(e).__name__}: {e}")), "failed"

    def __call__(self, handle, request):
        """A non-decoupled model: `handle(request)` returns the response."""
        try:
            response, outcome = handle(request), "ok"
        except Exception as e:  # noqa: BLE001 - one request's failure must not take the model down
            response, outcome = self._error(e)
        self.count[outcome].increment(1)
        return response

    def stream(self, handle, request) -> None:
        """A decoupled model: `handle(request, sender)` sends its responses but the last, which it returns;
        that one (or the error) goes out here with the final flag, in the same send."""
        sender = request.get_response_sender()
        try:
            response, outcome = handle(request, sender), "ok"
        except Exception as e:  # noqa: BLE001 - one request's failure must not take the model down
            response, outcome = self._error(e)
        self.count[outcome].increment(1)
        sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        """Metrics before their family, as Triton requires."""
        self.count.clear()
        self.family = None


class DecodeMetrics:
    """sparrow_llm's decoding metrics by strategy ("sparrow" speculative, "ar" plain)."""

    BUCKETS = {"accepted": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0], "step": [1, 2, 3, 4, 5, 6, 7, 8]}

    def __init__(self, pb_utils):
        mf = pb_utils.MetricFamily
        self.families = {
            "tokens": mf(name="sparrow_generated_tokens_total", kind=mf.COUNTER,
                         description="Tokens generated, by strategy"),
            "draft": mf(name="sparrow_draft_seconds_total", kind=mf.COUNTER,
                        description="Time in the Sparrow draft, by strategy"),
            "verify": mf(name="sparrow_verify_seconds_total", kind=mf.COUNTER,
                         description="Time in target verify steps, by strategy"),
            "accepted": mf(name="sparrow_mean_accepted_length", kind=mf.HISTOGRAM,
                           description="Per request: tokens per target step (mean accepted length)"),
            "step": mf(name="sparrow_accepted_length", kind=mf.HISTOGRAM,
                       description="Per draft/verify step: tokens committed (accepted drafts + the target's own)"),
        }
        self.metrics: dict = {}

    def _metric(self, key: str, strategy: str):
        if (key, strategy) not in self.metrics:
            extra = {"buckets": self.BUCKETS[key]} if key in self.BUCKETS else {}
            self.metrics[key, strategy] = self.families[key].Metric(labels={"strategy": strategy}, **extra)
        return self.metrics[key, strategy]

    def observe_step(self, strategy: str, committed: int) -> None:
        self._metric("step", strategy).observe(committed)

    def observe(self, stats: dict) -> None:
        strategy = stats["strategy"]
        self._metric("tokens", strategy).increment(stats["new_tokens"])
        steps = stats.get("target_steps") or 0
        if stats.get("mean_accepted_length"):
            self._metric("accepted", strategy).observe(stats["mean_accepted_length"])
            self._metric("draft", strategy).increment(stats["draft_ms_per_step"] * steps / 1000)
            self._metric("verify", strategy).increment(stats["verify_ms_per_step"] * steps / 1000)

    def close(self) -> None:
        self.metrics.clear()
        self.families.clear()


# ---- the model repository and the server ---------------------------------------------------------

def repo_source() -> Path:
    """The packaged model repository (`triton_repo/`, installed as `sparrow.triton_repo`)."""
    from . import triton_repo

    return Path(triton_repo.__file__).parent


def layout_repository(out: Path, cfg: ServeConfig) -> Path:
    """Write a runnable model repository under `out/models`, with the config parameters filled in."""
    src, dst = repo_source(), Path(out) / "models"
    if dst.exists():
        shutil.rmtree(dst)
    values = {k: str(v) for k, v in cfg.__dict__.items()}
    values["cancel_dir"] = str((Path(out) / "cancelled").resolve())  # CancelFlags, shared by two models
    for name in MODELS:
        (dst / name / "1").mkdir(parents=True)
        text = (src / name / "config.pbtxt").read_text()
        for k, v in values.items():
            text = text.replace("${" + k + "}", v)
        if "${" in text:
            raise RuntimeError(f"{name}/config.pbtxt has an unfilled parameter")
        (dst / name / "config.pbtxt").write_text(text)
        model_py = src / name / "1" / "model.py"
        if model_py.is_file():
            shutil.copy(model_py, dst / name / "1" / "model.py")
    return dst


def _pytriton_dir() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tritonserver not found: install the serve extra (pip install 'sparrow-trt[serve]', "
                           "which brings nvidia-pytriton==0.7.0 with Triton Inference Server 2.51)")
    return Path(list(spec.submodule_search_locations)[0])


def layout_backends(out: Path) -> Path:
    """A writable copy of the wheel's Python backend with the stub for the running Python beside it."""
    server = _pytriton_dir() / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"the nvidia-pytriton wheel has no Python backend stub for Python {ver}")
    dst = Path(out) / "backends"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(server / "backends", dst, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(stub, dst / "python" / "triton_python_backend_stub")
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}; "
                                   f"log tail:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver not READY after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass(frozen=True)
class GrpcTls:
    """TLS on the gRPC endpoint (PEM files): the server's certificate and key; with `client_ca`, mutual TLS
    (clients must present a certificate that CA signed)."""
    cert: Path
    key: Path
    client_ca: Path | None = None

    def args(self) -> list[str]:
        out = ["--grpc-use-ssl", "true", "--grpc-server-cert", str(self.cert), "--grpc-server-key", str(self.key)]
        if self.client_ca:
            out += ["--grpc-use-ssl-mutual", "true", "--grpc-root-cert", str(self.client_ca)]
        return out


def start_server(work_dir: Path, cfg: ServeConfig = ServeConfig(), http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, log_file: Path | None = None, threads: int | None = None,
                 grpc_tls: GrpcTls | None = None) -> Server:
    """Lay out the repository and backends under `work_dir`, then start tritonserver (not yet waited on)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    models = layout_repository(work_dir, cfg)
    backends = layout_backends(work_dir)
    server = _pytriton_dir() / "tritonserver"
    env = dict(os.environ)
    libs = str(server.parent.parent / "nvidia_pytriton.libs")
    # the stub links libpython3.X: load this interpreter's own (a shared build) rather than the system's,
    # whose private symbols may not match this interpreter's standard-library extensions
    pylib = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (pylib, libs, env.get("LD_LIBRARY_PATH")) if p)
    # the Python-backend stub's embedded interpreter finds its prefix (and so this virtual environment's
    # packages) through the first `python3` on PATH, as PyTriton arranges it
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = Path(log_file) if log_file else work_dir / "tritonserver.log"
    cmd = [str(server / "bin" / "tritonserver"), "--model-repository", str(models),
           "--backend-directory", str(backends), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
           "--metrics-port", str(metrics_port), "--allow-metrics", "true", "--strict-readiness", "true"]
    cmd += grpc_tls.args() if grpc_tls else []
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(proc, http_port, grpc_port, metrics_port, log)
