"""Load testing end to end: a real tritonserver, the real perf_analyzer binary (tritonclient 2.51) driven by
`sparrow-client load`, the soak through SparrowClient, and the torch-free client installed in a fresh venv."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

# the serving tests' server fixture (a real tritonserver on free ports, module-scoped) and demo videos; that
# module skips, and so this one, without the client and serve extras
from test_serving import demo_video, server  # noqa: F401

from sparrow.client.load import (LoadError, Measure, SoakConfig, SweepConfig, find_perf_analyzer, input_data,
                                 model_info, run_soak, run_sweep)
from sparrow.demo.text import CAPTION_PROMPT

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("videos")
    paths = []
    for seed in (7, 11):
        p = out / f"demo_{seed}.mp4"
        p.write_bytes(demo_video(seed))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def perf_analyzer():
    try:
        return find_perf_analyzer()
    except LoadError as e:
        if os.environ.get("CI"):  # CI runs scripts/setup.sh, which installs it: missing there is a failure
            pytest.fail(f"perf_analyzer should be installed by scripts/setup.sh: {e}")
        pytest.skip(f"perf_analyzer cannot run here: {e}")


def test_input_data_carries_the_video_files_exactly(server, videos):
    """perf_analyzer's JSON: a BYTES element as base64 of Triton's serialisation (4-byte length + bytes)."""
    model = model_info(server.grpc_url)
    data = input_data(model, [p.read_bytes() for p in videos], CAPTION_PROMPT, speculative=False, max_tokens=8)
    assert len(data["data"]) == len(videos)
    for entry, path in zip(data["data"], videos):
        raw = base64.b64decode(entry["video"]["b64"])
        (n,) = struct.unpack("<I", raw[:4])
        assert n == len(raw) - 4 and raw[4:] == path.read_bytes()
        assert entry["prompt"] == [CAPTION_PROMPT] and entry["max_tokens"] == [8]
        assert entry[model.ab_input] == model.ab_value(False)
    json.dumps(data)  # plain JSON, as perf_analyzer reads it


def test_perf_analyzer_sweep_writes_a_report(server, videos, perf_analyzer, tmp_path):
    """A real perf_analyzer sweep (2 levels, A/B) with zero errors, parsed into the report directory."""
    out = tmp_path / "report"
    cfg = SweepConfig(server.grpc_url, videos, CAPTION_PROMPT, concurrency=[1, 2], measure=Measure(request_count=6),
                      ab=True, max_tokens=MAX_TOKENS, out=out,
                      metrics_url=f"http://127.0.0.1:{server.metrics_port}/metrics")
    report = run_sweep(cfg, progress=print)
    assert report.ok, [lv.error for lv in report.levels]
    assert [(lv.mode, lv.concurrency) for lv in report.levels] == [
        ("speculative", 1), ("ar", 1), ("speculative", 2), ("ar", 2)]
    model = model_info(server.grpc_url)
    for lv in report.levels:
        assert lv.server_failures == 0 and not lv.error
        assert lv.requests >= 6 and lv.throughput > 0 and lv.tokens_per_s > 0
        assert 0 < lv.p50_ms <= lv.p90_ms <= lv.p99_ms
        if model.decoupled:  # streamed: time to first token measured, and no later than the whole answer
            assert report.streaming and 0 < lv.ttft_p50_ms <= lv.p50_ms + 1e-6
        assert (lv.mean_accepted_length or 0) >= (1.0 if lv.mode == "speculative" else 0)
        assert (out / f"perf_analyzer_{lv.mode}_c{lv.concurrency}.csv").stat().st_size > 0
        rows = (out / f"requests_{lv.mode}_c{lv.concurrency}.csv").read_text().splitlines()
        assert len(rows) == lv.requests + 1
    md = (out / "report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| speculative") or ln.startswith("| ar")]
    assert len(table) == 4 and all("FAILED" not in ln for ln in table)
    assert "x |" in table[0]  # the speedup column, speculative vs ar at concurrency 1
    assert json.loads((out / "report.json").read_text())["ok"] is True
    assert (out / "throughput_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "commands.txt").read_text().splitlines()) == 4


def test_a_refused_request_stops_the_sweep_with_the_servers_error(server, videos, perf_analyzer, tmp_path):
    cfg = SweepConfig(server.grpc_url, videos, "   ", concurrency=[1, 2], measure=Measure(request_count=4),
                      out=tmp_path, metrics_url=f"http://127.0.0.1:{server.metrics_port}/metrics")
    report = run_sweep(cfg, progress=print)
    assert not report.ok and len(report.levels) == 1  # stopped at the first level
    assert "prompt is empty" in report.levels[0].error and report.levels[0].server_failures >= 1
    assert "| speculative | 1 | FAILED: " in (tmp_path / "report.md").read_text()


def test_perf_analyzer_missing_is_a_clear_error(tmp_path):
    with pytest.raises(LoadError, match="no perf_analyzer binary"):
        find_perf_analyzer(tmp_path / "perf_analyzer")


def test_soak_answers_match_the_single_request_answers(server, videos):
    report = run_soak(SoakConfig(server.grpc_url, videos, CAPTION_PROMPT, duration_s=12, concurrency=2,
                                 max_requests=400, max_tokens=MAX_TOKENS, timeout_s=120), progress=print)
    assert report.ok, report.examples
    assert report.requests == report.answered >= 4
    assert report.failed == 0 and report.mismatched == 0
    assert 0 < report.p50_ms <= report.p99_ms


def test_client_installs_and_works_without_torch(server, videos, tmp_path):
    """`pip install ./client` (the sparrow-client distribution) in a fresh venv: no torch, and it answers."""
    src = tmp_path / "src"
    # a copy, so the build leaves nothing in the work tree
    shutil.copytree(REPO / "client", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, cli = venv / "bin" / "python", venv / "bin" / "sparrow-client"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    no_torch = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    for args in (["--help"], ["load", "--help"]):
        res = subprocess.run([str(cli), *args], capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0 and "usage: sparrow-client" in res.stdout, res.stderr
    res = subprocess.run([str(cli), "infer", "--url", server.grpc_url, "--video", str(videos[0]),
                          "--prompt", CAPTION_PROMPT, "--max-tokens", "8", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    answer = json.loads(res.stdout.strip().splitlines()[-1])
    assert answer["text"] and 0 < len(answer["token_ids"]) <= 8
    where = subprocess.run([str(py), "-c", "import sparrow.client, sys; print(sparrow.client.__file__); "
                            "print('torch' in sys.modules)"], capture_output=True, text=True, cwd=tmp_path)
    path, torch_loaded = where.stdout.split()
    assert path.startswith(str(venv)) and torch_loaded == "False"
