"""Triton serving end to end: a real tritonserver (from the nvidia-pytriton wheel) serving triton_repo/,
called over real gRPC with sparrow.client; answers checked against in-process decoding."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="the client extra (tritonclient[grpc]) is not installed")
if __import__("importlib").util.find_spec("pytriton") is None:
    pytest.skip("the serve extra (nvidia-pytriton, which carries tritonserver) is not installed",
                allow_module_level=True)

from sparrow.client import SparrowClient, SparrowServerError  # noqa: E402
from sparrow.demo.text import CAPTION_PROMPT  # noqa: E402
from sparrow.demo.world import make_scene, render  # noqa: E402
from sparrow.serving import ServeConfig, free_port, start_server  # noqa: E402
from sparrow.video import decode, encode  # noqa: E402

MAX_FRAMES = 48
MAX_VIDEO_BYTES = 1 << 20
MAX_TOKENS = 24


def demo_video(seed: int, frames: int = 32, side: int = 64) -> bytes:
    return encode(render(make_scene(seed), frames, side, side))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServeConfig(max_video_bytes=MAX_VIDEO_BYTES, max_frames=MAX_FRAMES, max_len=4096, max_tokens_limit=64)
    try:
        srv = start_server(tmp_path_factory.mktemp("serve"), cfg, http_port=free_port(), grpc_port=free_port(),
                           metrics_port=free_port(), threads=1)
    except OSError as e:  # the binary itself cannot run on this machine
        pytest.skip(f"tritonserver cannot start here: {e}")
    try:
        srv.wait_ready(timeout=240)  # a failure to load a model fails the tests, with the server's log
        yield srv
    finally:
        assert srv.stop() is not None


@pytest.fixture(scope="module")
def client(server):
    with SparrowClient(server.grpc_url, timeout_s=300) as c:
        assert c.ready()
        yield c


@pytest.fixture(scope="module")
def target():
    from sparrow.demo.model import DEMO_TARGET_DIR
    from sparrow.target import Target

    return Target.load(DEMO_TARGET_DIR)


@pytest.mark.parametrize("seed,prompt", [(7, CAPTION_PROMPT), (11, None)])
def test_answer_equals_local_autoregressive(client, target, seed, prompt):
    """Sparrow speculative decoding behind Triton is lossless: the same tokens as local greedy `ar`."""
    from sparrow.demo.text import questions
    from sparrow.generate import generate_ar

    video = demo_video(seed)
    prompt = prompt or questions(make_scene(seed))[0].question
    want = generate_ar(target, decode(video), prompt, max_new_tokens=MAX_TOKENS)
    got = client.infer(video, prompt, strategy="sparrow", max_tokens=MAX_TOKENS)
    assert got.token_ids == want.token_ids
    assert got.text == want.text and got.text
    s = got.stats
    assert s["strategy"] == "sparrow" and s["new_tokens"] == len(want.token_ids)
    if s["target_steps"]:
        assert s["mean_accepted_length"] >= 1.0 and s["draft_ms_per_step"] > 0 and s["verify_ms_per_step"] > 0
    ar = client.infer(video, prompt, strategy="ar", max_tokens=MAX_TOKENS)
    assert ar.token_ids == want.token_ids and ar.stats["strategy"] == "ar"


def test_corrupt_video_is_refused_and_server_keeps_serving(client):
    rng = np.random.default_rng(0)
    with pytest.raises(SparrowServerError, match="bad video: cannot open video") as e:
        client.infer(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "what happens ?")
    assert e.value.status == "StatusCode.INVALID_ARGUMENT"
    truncated = demo_video(3)[:200]  # a real mp4 header with nothing decodable after it
    with pytest.raises(SparrowServerError, match="bad video"):
        client.infer(truncated, "what happens ?")
    ok = client.infer(demo_video(3), CAPTION_PROMPT, max_tokens=4)
    assert ok.text and len(ok.token_ids) <= 4


@pytest.mark.parametrize("case,match", [
    ("empty_prompt", "prompt is empty"),
    ("too_many_frames", f"more than {MAX_FRAMES} frames"),
    ("oversized", "video too large"),
    ("empty_video", "video is empty"),
    ("strategy", "unknown strategy"),
    ("max_tokens", r"max_tokens must lie in \[1, 64\]"),
])
def test_bad_requests_get_named_errors(client, case, match):
    video, prompt, kw = demo_video(5, frames=8), "what happens ?", {}
    if case == "empty_prompt":
        prompt = "  "
    elif case == "too_many_frames":
        video = demo_video(5, frames=MAX_FRAMES + 8, side=32)
    elif case == "oversized":
        video = bytes(MAX_VIDEO_BYTES + 1)
    elif case == "empty_video":
        video = b""
    elif case == "strategy":
        kw["strategy"] = "medusa"
    else:
        kw["max_tokens"] = 1000
    with pytest.raises(SparrowServerError, match=match):
        client.infer(video, prompt, **kw)
    assert client.ready()


def test_bad_request_beside_a_concurrent_good_one(server, client):
    from concurrent.futures import ThreadPoolExecutor

    with SparrowClient(server.grpc_url, timeout_s=300) as other, ThreadPoolExecutor(2) as pool:
        good = pool.submit(client.infer, demo_video(9), CAPTION_PROMPT, max_tokens=8)
        bad = pool.submit(other.infer, b"not a video at all", "what happens ?")
        assert good.result().text
        with pytest.raises(SparrowServerError, match="bad video"):
            bad.result()


def _metric(text: str, name: str, **labels) -> float:
    """The value of the sample of `name` whose labels include `labels` (0 when absent)."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


def test_metrics_on_the_metrics_port(server, client):
    import urllib.request

    client.infer(demo_video(3), CAPTION_PROMPT, max_tokens=8)
    with pytest.raises(SparrowServerError):
        client.infer(b"", "what happens ?")
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert _metric(text, "sparrow_requests_total", model="preprocessing", outcome="refused") >= 1
    assert _metric(text, "sparrow_requests_total", model="sparrow_llm", outcome="ok") >= 1
    assert _metric(text, "sparrow_generated_tokens_total", strategy="sparrow") >= 1
    assert _metric(text, "sparrow_mean_accepted_length_count", strategy="sparrow") >= 1
    assert _metric(text, "sparrow_verify_seconds_total", strategy="sparrow") > 0
    assert "nv_inference_request_success" in text  # Triton's own metrics beside ours


def test_client_imports_without_torch():
    code = ("import sys; import sparrow.client, sparrow.client.cli; "
            "assert 'torch' not in sys.modules, 'sparrow.client imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help():
    for cmd in ([sys.executable, "-m", "sparrow.cli", "serve", "--help"],
                [sys.executable, "-m", "sparrow.client.cli", "infer", "--help"]):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        assert "--grpc-port" in out or "--url" in out
