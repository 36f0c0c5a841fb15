"""`sparrow serve --engines DIR`: the demo recipe's build (tests/conftest.py) served by a real tritonserver through
the command line, the vision encoder in ONNX Runtime and the target converted back from the TensorRT-LLM
checkpoint; answers equal in-process greedy decoding of the source model. Refusals happen before any server
starts: a tampered artifact, no manifest, --backend tensorrt_llm where TensorRT-LLM is absent."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("tritonclient.grpc", reason="the client extra (tritonclient[grpc]) is not installed")
if importlib.util.find_spec("pytriton") is None:
    pytest.skip("the serve extra (nvidia-pytriton, which carries tritonserver) is not installed",
                allow_module_level=True)

from sparrow.client import SparrowClient  # noqa: E402
from sparrow.demo.text import CAPTION_PROMPT, questions  # noqa: E402
from sparrow.demo.world import make_scene, render  # noqa: E402
from sparrow.serving import free_port  # noqa: E402
from sparrow.video import decode, encode  # noqa: E402

SERVE = [sys.executable, "-m", "sparrow.cli", "serve"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the machine is shared: one thread per server process


def _refused(args: list[str], work) -> str:
    """Run `sparrow serve ARGS`, which must exit non-zero before starting tritonserver; its stderr."""
    out = subprocess.run(SERVE + args + ["--work-dir", str(work)], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert out.returncode != 0, out.stdout
    assert not (work / "tritonserver.log").exists()  # refused before laying out or starting the server
    return out.stderr


@pytest.fixture(scope="module")
def served(demo_build, tmp_path_factory):
    """`sparrow serve --engines <demo build>` as a user runs it; (gRPC url, work dir)."""
    out, _ = demo_build
    work = tmp_path_factory.mktemp("serve_engines")
    grpc = free_port()
    proc = subprocess.Popen(SERVE + ["--engines", str(out), "--grpc-port", str(grpc), "--http-port", str(free_port()),
                                     "--metrics-port", str(free_port()), "--work-dir", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        line = ""
        while not line.startswith("READY"):  # sparrow serve prints READY once every model loaded
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"sparrow serve exited ({proc.poll()})"
        yield f"localhost:{grpc}", work
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_served_build_answers_like_the_source_model(served, demo_build):
    """Through preprocessing -> vision_encoder (ONNX Runtime) -> sparrow_llm (reference target, build's draft) ->
    postprocessing: the same tokens as in-process greedy decoding of the source model (torch vision tower)."""
    from sparrow.demo.model import DEMO_TARGET_DIR
    from sparrow.generate import generate_ar
    from sparrow.target import Target

    url, work = served
    target = Target.load(DEMO_TARGET_DIR)
    with SparrowClient(url, timeout_s=300) as c:
        assert c.health().models["vision_encoder"]
        for seed, prompt in ((7, CAPTION_PROMPT), (11, questions(make_scene(11))[0].question)):
            video = encode(render(make_scene(seed), 32, 64, 64))
            want = generate_ar(target, decode(video), prompt, max_new_tokens=24)
            for speculative in (True, False):
                got = c.infer(video, prompt, max_tokens=24, speculative=speculative)
                assert got.token_ids == want.token_ids and got.text == want.text
    # the configs were filled from the manifest: the build's files, its window and limits
    out, _ = demo_build
    serve = json.loads((out / "manifest.json").read_text())["serve"]
    llm = (work / "models" / "sparrow_llm" / "config.pbtxt").read_text()
    assert f'"{out.resolve() / "reference" / "target"}"' in llm and f'"{out.resolve() / "draft"}"' in llm
    for key in ("window", "draft_len", "max_len"):
        assert f'key: "{key}" value: {{ string_value: "{serve[key]}" }}' in llm
    assert "count: 1 kind: KIND_CPU" in llm
    vision = (work / "models" / "vision_encoder" / "config.pbtxt").read_text()
    assert f'"{out.resolve() / "vision" / "encoder.onnx"}"' in vision
    ensemble = (work / "models" / "sparrow" / "config.pbtxt").read_text()
    assert ensemble.index('"preprocessing"') < ensemble.index('"vision_encoder"') < ensemble.index('"sparrow_llm"')


def test_tampered_build_is_refused(demo_build, tmp_path):
    copy = tmp_path / "build"
    shutil.copytree(demo_build[0], copy)
    with open(copy / "reference" / "target" / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))  # one bit: same size
    err = _refused(["--engines", str(copy)], tmp_path / "work1")
    assert "does not match its manifest" in err and "modified: reference/target/model.safetensors" in err
    err = _refused(["--engines", str(tmp_path)], tmp_path / "work2")
    assert "no manifest.json" in err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed here")
def test_tensorrt_llm_backend_absent_is_a_clear_error(demo_build, tmp_path):
    t0 = time.perf_counter()
    err = _refused(["--engines", str(demo_build[0]), "--backend", "tensorrt_llm"], tmp_path / "work")
    assert "needs the `tensorrt_llm` Python package" in err and "--backend torch" in err
    assert time.perf_counter() - t0 < 60


def test_sigint_stops_a_server_started_in_the_background(demo_build, tmp_path):
    """`sparrow serve ... &` from a script inherits SIGINT ignored; `kill -INT` must still stop it and its
    tritonserver."""
    out, _ = demo_build
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731  what `cmd &` does
    proc = subprocess.Popen(SERVE + ["--engines", str(out), "--grpc-port", str(free_port()), "--http-port",
                                     str(free_port()), "--metrics-port", str(free_port()), "--work-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            preexec_fn=ignore_sigint)
    try:
        line = ""
        while not line.startswith("READY"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"sparrow serve exited ({proc.poll()})"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "stopped (exit code 0)" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
