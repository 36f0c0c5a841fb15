"""Triton serving end to end: a real tritonserver (from the nvidia-pytriton wheel) serving triton_repo/,
called over real gRPC streams with sparrow.client (sync and asyncio); answers checked against in-process
decoding."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="the client extra (tritonclient[grpc]) is not installed")
if __import__("importlib").util.find_spec("pytriton") is None:
    pytest.skip("the serve extra (nvidia-pytriton, which carries tritonserver) is not installed",
                allow_module_level=True)

from sparrow.client import (Answer, AsyncSparrowClient, RetryPolicy, SparrowClient,  # noqa: E402
                            SparrowInvalidRequest, SparrowServerError, SparrowUnavailable)
from sparrow.demo.text import CAPTION_PROMPT  # noqa: E402
from sparrow.demo.world import make_scene, render  # noqa: E402
from sparrow.serving import ServeConfig, free_port, start_server, text_piece  # noqa: E402
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
        t0 = time.perf_counter()
        assert srv.stop() is not None
    # a request left in flight (e.g. a cancelled stream never completed) holds shutdown for Triton's whole
    # 30 s exit timeout
    assert time.perf_counter() - t0 < 20, f"slow shutdown: requests left in flight?\n{srv.log_tail()}"


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


def streamed(client: SparrowClient, *args, **kw) -> tuple[list[str], Answer]:
    items = list(client.stream(*args, **kw))
    assert isinstance(items[-1], Answer) and all(isinstance(p, str) for p in items[:-1])
    return items[:-1], items[-1]


@pytest.mark.parametrize("seed,prompt", [(7, CAPTION_PROMPT), (11, None)])
def test_streamed_answer_equals_local_autoregressive(client, target, seed, prompt):
    """Sparrow speculative decoding behind Triton is lossless and streams: the same tokens as local greedy
    `ar`, in several pieces that concatenate to the text; speculative=false gives the same tokens."""
    from sparrow.demo.text import questions
    from sparrow.generate import generate_ar

    video = demo_video(seed)
    prompt = prompt or questions(make_scene(seed))[0].question
    want = generate_ar(target, decode(video), prompt, max_new_tokens=MAX_TOKENS)
    pieces, got = streamed(client, video, prompt, max_tokens=MAX_TOKENS)
    assert got.token_ids == want.token_ids
    assert "".join(pieces) == got.text == want.text and got.text
    words = want.text.split()  # the demo tokenizer is word-level: one token per word, plus end-of-turn
    assert len(pieces) > 1 or len(words) == 1
    assert got.first_piece_s is not None and got.first_piece_s <= got.total_s
    s = got.stats
    assert s["strategy"] == "sparrow" and s["new_tokens"] == len(want.token_ids)
    if s["target_steps"]:
        assert s["mean_accepted_length"] >= 1.0 and s["draft_ms_per_step"] > 0 and s["verify_ms_per_step"] > 0
    ar_pieces, ar = streamed(client, video, prompt, max_tokens=MAX_TOKENS, speculative=False)
    assert ar.token_ids == want.token_ids and ar.text == want.text and ar.stats["strategy"] == "ar"
    assert len(ar_pieces) == len(words)  # plain decoding streams every token on its own


def test_frames_input_and_sampling(client):
    video = demo_video(4)
    frames = decode(video)  # uint8 [N, H, W, 3]
    by_video = client.infer(video, CAPTION_PROMPT, max_tokens=12, num_frames=8)
    by_frames = client.infer(frames=frames, prompt=CAPTION_PROMPT, max_tokens=12, num_frames=8)
    assert by_frames.token_ids == by_video.token_ids and by_frames.text
    # temperature > 0: rejection sampling on the chain, reproducible for a seed
    a, b = (client.infer(video, CAPTION_PROMPT, max_tokens=16, temperature=1.5, seed=3) for _ in range(2))
    assert a.token_ids == b.token_ids and a.stats["strategy"] == "sparrow"


def test_pieces_concatenate_exactly():
    """Incremental detokenisation on a real byte-level decode: a character split over tokens is held back
    until complete, and every split of the ids gives pieces that join to the full text."""
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace").strip()

    ids = list(" naïve – 東京 ok".encode("utf-8"))
    for cut in range(len(ids) + 1):
        for step in (1, 2, 3):
            chunks = [ids[:cut]] + [ids[i:i + step] for i in range(cut, len(ids), step)] + [[]]
            prior, text = [], ""
            for i, chunk in enumerate(chunks):
                piece = text_piece(decode, prior, chunk, final=i == len(chunks) - 1)
                assert "\ufffd" not in piece
                text, prior = text + piece, prior + chunk
            assert text == decode(ids)


def _metrics(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str, **labels) -> float:
    """The value of the sample of `name` whose labels include `labels` (0 when absent)."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


def test_cancelled_stream_frees_the_instance(server, client):
    """Leaving a stream after its first piece cancels the request: sparrow_llm stops decoding (counted
    as cancelled) and the next request is answered at once."""
    video = demo_video(12, frames=MAX_FRAMES)

    def cancelled() -> tuple[float, float]:
        """(sparrow_llm requests that stopped as cancelled, ensemble requests completed as cancelled)"""
        text = _metrics(server)
        return (_metric(text, "sparrow_requests_total", model="sparrow_llm", outcome="cancelled"),
                _metric(text, "nv_inference_request_failure", model="sparrow", reason="OTHER"))

    before = cancelled()
    stream = client.stream(video, CAPTION_PROMPT, max_tokens=64, speculative=False)
    assert isinstance(next(stream), str)
    stream.close()  # what leaving a `for` loop over it does
    deadline = time.monotonic() + 10
    while not (cancelled()[0] == before[0] + 1 and cancelled()[1] > before[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    # the decoder stopped, and the ensemble request completed (as failed: its LLM step ended cancelled);
    # that none is left in flight, the server fixture checks at shutdown
    assert cancelled()[0] == before[0] + 1 and cancelled()[1] > before[1]
    t0 = time.perf_counter()
    assert client.infer(video, CAPTION_PROMPT, max_tokens=4).text
    assert time.perf_counter() - t0 < 5.0


def test_timeout_is_typed_and_the_server_goes_on(server, client):
    from sparrow.client import SparrowTimeout

    with SparrowClient(server.grpc_url, timeout_s=0.05) as hasty:
        with pytest.raises(SparrowTimeout):
            hasty.infer(demo_video(12, frames=MAX_FRAMES), CAPTION_PROMPT, max_tokens=64)
    assert client.infer(demo_video(3), CAPTION_PROMPT, max_tokens=4).text


@pytest.mark.parametrize("case,match", [
    ("empty_prompt", "prompt is empty"),
    ("too_many_frames", f"more than {MAX_FRAMES} frames"),
    ("too_many_raw_frames", f"too many frames: {MAX_FRAMES + 1} > {MAX_FRAMES}"),
    ("oversized", "video too large"),
    ("empty_video", "video is empty"),
    ("corrupt_video", "bad video: cannot open video"),
    ("truncated_video", "bad video"),
    ("both", "send exactly one of `video`"),
    ("neither", "got neither"),
    ("frames_dtype", "data-type is 'FP32', but model 'sparrow' expects 'UINT8'"),
    ("frames_shape", "unexpected shape for input 'frames'"),
    ("max_tokens", r"max_tokens must lie in \[1, 64\]"),
    ("temperature", r"temperature must lie in \[0, 10\]"),
    ("unknown_model", "unknown model"),
])
def test_bad_requests_get_named_errors(server, client, case, match):
    video, frames, prompt, kw = demo_video(5, frames=8), None, "what happens ?", {}
    if case == "empty_prompt":
        prompt = "  "
    elif case == "too_many_frames":
        video = demo_video(5, frames=MAX_FRAMES + 8, side=32)
    elif case == "too_many_raw_frames":
        video, frames = None, np.zeros((MAX_FRAMES + 1, 16, 16, 3), np.uint8)
    elif case == "oversized":
        video = bytes(MAX_VIDEO_BYTES + 1)
    elif case == "empty_video":
        video = b""
    elif case == "corrupt_video":
        video = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    elif case == "truncated_video":
        video = video[:200]  # a real mp4 header with nothing decodable after it
    elif case == "both":
        frames = decode(video)
    elif case == "neither":
        video = None
    elif case == "frames_dtype":
        video, frames = None, np.zeros((4, 16, 16, 3), np.float32)
    elif case == "frames_shape":
        video, frames = None, np.zeros((4, 16, 3), np.uint8)
    elif case == "max_tokens":
        kw["max_tokens"] = 1000
    elif case == "temperature":
        kw["temperature"] = -1.0
    if case == "unknown_model":
        with SparrowClient(server.grpc_url, model="no_such_model") as other:
            with pytest.raises(SparrowInvalidRequest, match=match):
                other.infer(video, prompt)
    else:
        with pytest.raises(SparrowInvalidRequest, match=match) as e:
            client.infer(video, prompt, frames=frames, **kw)
        assert e.value.status == "INVALID_ARGUMENT"
    assert client.ready()


def test_bad_requests_beside_a_concurrent_good_one(server, client):
    with SparrowClient(server.grpc_url, timeout_s=300) as other, ThreadPoolExecutor(3) as pool:
        good = pool.submit(client.infer, demo_video(9), CAPTION_PROMPT, max_tokens=8)
        bad = [pool.submit(other.infer, b"not a video at all", "what happens ?"),
               pool.submit(other.infer, frames=np.zeros((2, 8, 8, 3), np.uint8), prompt="")]
        assert good.result().text
        for b, match in zip(bad, ("bad video", "prompt is empty")):
            with pytest.raises(SparrowInvalidRequest, match=match):
                b.result()


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (tritonserver and its Python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def test_memory_flat_over_200_bad_requests(server, client):
    corrupt = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    bad = [dict(video=corrupt, prompt="what happens ?"), dict(video=demo_video(2, frames=4), prompt=" "),
           dict(frames=np.zeros((MAX_FRAMES + 1, 16, 16, 3), np.uint8), prompt="what happens ?"),
           dict(frames=np.zeros((4, 16, 16, 3), np.float32), prompt="what happens ?")]

    def send(n: int) -> None:
        for i in range(n):
            with pytest.raises(SparrowInvalidRequest):
                client.infer(**bad[i % len(bad)])

    send(40)  # first-use allocations (decoder, tokenizer paths) before the baseline
    before = _rss_mb(server.process.pid)
    send(200)
    growth = _rss_mb(server.process.pid) - before
    assert growth < 50, f"server memory grew {growth:.1f} MB over 200 bad requests"
    assert client.infer(demo_video(2), CAPTION_PROMPT, max_tokens=4).text


def test_async_client(server):
    video = demo_video(7)

    async def main():
        async with AsyncSparrowClient(server.grpc_url, timeout_s=300) as c:
            assert await c.ready()
            health = await c.health()
            assert health.live and health.ready and all(health.models.values())
            items = [x async for x in c.stream(video, CAPTION_PROMPT, max_tokens=MAX_TOKENS)]
            answers = await asyncio.gather(c.infer(video, CAPTION_PROMPT, max_tokens=MAX_TOKENS),
                                           c.infer(video, CAPTION_PROMPT, max_tokens=MAX_TOKENS, speculative=False))
            with pytest.raises(SparrowInvalidRequest, match="bad video"):
                await c.infer(b"junk", CAPTION_PROMPT)
            return items, answers

    items, answers = asyncio.run(main())
    assert "".join(items[:-1]) == items[-1].text
    assert all(a.token_ids == items[-1].token_ids for a in answers)


def test_metrics_on_the_metrics_port(server, client):
    client.infer(demo_video(3), CAPTION_PROMPT, max_tokens=8)
    client.infer(demo_video(3), CAPTION_PROMPT, max_tokens=8, speculative=False)
    with pytest.raises(SparrowServerError):
        client.infer(b"", "what happens ?")
    text = _metrics(server)
    assert _metric(text, "sparrow_requests_total", model="preprocessing", outcome="refused") >= 1
    assert _metric(text, "sparrow_requests_total", model="sparrow_llm", outcome="ok") >= 2
    assert _metric(text, "sparrow_generated_tokens_total", strategy="sparrow") >= 1
    assert _metric(text, "sparrow_generated_tokens_total", strategy="ar") >= 1
    assert _metric(text, "sparrow_accepted_length_count", strategy="sparrow") >= 1  # per draft/verify step
    assert _metric(text, "sparrow_mean_accepted_length_count", strategy="sparrow") >= 1  # per request
    assert _metric(text, "sparrow_draft_seconds_total", strategy="sparrow") > 0
    assert _metric(text, "sparrow_verify_seconds_total", strategy="sparrow") > 0
    assert "nv_inference_request_success" in text  # Triton's own metrics beside ours


def test_server_down_is_a_clear_error_after_retries():
    retry = RetryPolicy(attempts=3, initial_backoff_s=0.2)
    with SparrowClient(f"localhost:{free_port()}", timeout_s=30, retry=retry) as c:
        t0 = time.perf_counter()
        with pytest.raises(SparrowUnavailable, match="unavailable after 3 attempts"):
            c.infer(b"video", "what happens ?")
        assert time.perf_counter() - t0 >= 0.2 + 0.4  # it backed off between the attempts


def test_cli_stream_and_health(server, tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(demo_video(7))
    cli = [sys.executable, "-m", "sparrow.client.cli"]
    out = subprocess.run(cli + ["infer", "--url", server.grpc_url, "--video", str(video), "--prompt", CAPTION_PROMPT,
                                "--max-tokens", "12", "--stream"], check=True, capture_output=True, text=True)
    assert out.stdout.strip() and "tok/s" in out.stderr and "mean accepted length" in out.stderr
    out = subprocess.run(cli + ["health", "--url", server.grpc_url], check=True, capture_output=True, text=True)
    assert "live True, ready True" in out.stdout and "sparrow_llm" in out.stdout


def _tls_files(d: Path) -> dict[str, Path]:
    """A throwaway CA, and a server (localhost) and a client certificate it signed (openssl)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=sparrow-test-ca")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else 'sparrow-test-client'}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext")
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_mutual_tls(tmp_path):
    """A server with mutual TLS on gRPC: the client's TLS files go through to tritonclient and it streams an
    answer; without its certificate, or without TLS, it is refused."""
    import shutil

    from sparrow.client import Connection
    from sparrow.serving import GrpcTls

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test's certificates)")
    f = _tls_files(tmp_path)
    srv = start_server(tmp_path / "serve", ServeConfig(max_len=4096), http_port=free_port(), grpc_port=free_port(),
                       metrics_port=free_port(), threads=1,
                       grpc_tls=GrpcTls(f["server.pem"], f["server.key"], client_ca=f["ca.pem"]))
    once = RetryPolicy(attempts=1)
    try:
        srv.wait_ready(timeout=240)
        tls = Connection(srv.grpc_url, ssl=True, root_certificates=str(f["ca.pem"]), private_key=str(f["client.key"]),
                         certificate_chain=str(f["client.pem"]), headers={"x-request-source": "test"})
        with SparrowClient(connection=tls, timeout_s=120, retry=once) as c:
            assert c.infer(demo_video(7), CAPTION_PROMPT, max_tokens=6).text
        no_cert = Connection(srv.grpc_url, ssl=True, root_certificates=str(f["ca.pem"]))
        for conn in (no_cert, Connection(srv.grpc_url)):
            with SparrowClient(connection=conn, timeout_s=30, retry=once) as c:
                with pytest.raises(SparrowUnavailable):
                    c.infer(demo_video(7), CAPTION_PROMPT, max_tokens=2)
    finally:
        srv.stop()


def test_client_imports_without_torch():
    code = ("import sys; import sparrow.client, sparrow.client.api, sparrow.client.cli; "
            "assert 'torch' not in sys.modules, 'sparrow.client imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help():
    for cmd in ([sys.executable, "-m", "sparrow.cli", "serve", "--help"],
                [sys.executable, "-m", "sparrow.client.cli", "infer", "--help"],
                [sys.executable, "-m", "sparrow.client.cli", "health", "--help"]):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        assert "--grpc-port" in out or "--url" in out
