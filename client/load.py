"""`sparrow-client load`: perf_analyzer concurrency sweeps (with an A/B against plain autoregressive
decoding) and a soak test that checks every answer under load. Imports no torch.

The sweep drives Triton's own load generator, perf_analyzer (the binary inside the tritonclient 2.51
wheel, see `find_perf_analyzer`), once per concurrency level, with `--input-data` built from real
video files; it parses perf_analyzer's CSV and its profile export (per-request timestamps and
responses) into a report directory. The soak uses `SparrowClient` from threads, because it must
compare every answer with the single-request answer for the same input, which perf_analyzer cannot.
"""

from __future__ import annotations

import argparse
import base64
import csv
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .api import SparrowClient, SparrowServerError

PERF_ANALYZER = "perf_analyzer"
# Shared libraries perf_analyzer 2.51 links that a bare machine may lack, and what provides them.
LIBRARY_FIXES = {
    "libb64.so.0d": "the Debian/Ubuntu package libb64-0d (apt-get install libb64-0d)",
    "libcudart.so.12": "the PyPI wheel nvidia-cuda-runtime-cu12 (pip install 'sparrow-client[load]'); no GPU needed",
}


class LoadError(RuntimeError):
    """A load test could not run (missing binary or library, unreachable server, unusable model)."""


# ---- perf_analyzer -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]  # the environment to run it in (LD_LIBRARY_PATH reaching libcudart)

    def run(self, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], env=self.env, capture_output=True, text=True,
                              errors="replace", timeout=timeout)


def _cudart_dir() -> Path | None:
    """nvidia-cuda-runtime-cu12's library folder (nvidia/cuda_runtime/lib), when that wheel is installed."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "lib" / "libcudart.so.12").exists():
            return Path(root) / "lib"
    return None


def find_perf_analyzer(explicit: str | os.PathLike | None = None) -> PerfAnalyzer:
    """The perf_analyzer binary (`explicit`, else this interpreter's bin folder, where the tritonclient
    wheel puts it, else PATH), checked to start: a clear LoadError names whatever is missing."""
    if explicit:
        candidates = [Path(explicit)]
    else:
        found = shutil.which(PERF_ANALYZER)
        candidates = [Path(sys.executable).parent / PERF_ANALYZER] + ([Path(found)] if found else [])
    binary = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if binary is None:
        raise LoadError(f"no perf_analyzer binary at {', '.join(map(str, candidates))}: install tritonclient==2.51.0 "
                        "(pip install 'sparrow-client[load]'; later tritonclient wheels carry a perf_analyzer that "
                        "needs glibc 2.38) or pass --perf-analyzer PATH")
    env = dict(os.environ)
    cudart = _cudart_dir()
    if cudart:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH")) if p)
    pa = PerfAnalyzer(binary, env)
    res = pa.run(["--version"], timeout=30)
    if res.returncode != 0:
        out = res.stdout + res.stderr
        missing = [lib for lib in LIBRARY_FIXES if lib in out]
        hint = "; ".join(f"{lib} is missing: install {LIBRARY_FIXES[lib]}" for lib in missing)
        raise LoadError(f"{binary} cannot start (exit {res.returncode}): {hint or out.strip()[-500:]}")
    return pa


# ---- the model, read from the server ------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """What the harness needs from the served ensemble's config (so it follows whatever inputs it has)."""
    name: str
    inputs: dict[str, tuple[str, bool]]  # input name -> (Triton data type, optional)
    decoupled: bool  # streams several responses per request

    @property
    def ab_input(self) -> str:
        """The input that turns speculative decoding off: BOOL `speculative`, or the older `strategy`."""
        for name in ("speculative", "strategy"):
            if name in self.inputs:
                return name
        raise LoadError(f"model {self.name!r} has neither a `speculative` nor a `strategy` input: no A/B switch")

    def ab_value(self, speculative: bool) -> list:
        if self.ab_input == "speculative":
            return [speculative]
        return ["sparrow" if speculative else "ar"]


def model_info(url: str, model: str = "sparrow") -> ModelInfo:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(url) as c:
            if not c.is_model_ready(model):
                raise LoadError(f"model {model!r} is not ready on {url}")
            cfg = c.get_model_config(model, as_json=True)["config"]
    except InferenceServerException as e:
        raise LoadError(f"cannot reach the server at {url}: {e.message()}") from e
    inputs = {i["name"]: (i["data_type"], bool(i.get("optional"))) for i in cfg.get("input", [])}
    return ModelInfo(model, inputs, bool(cfg.get("model_transaction_policy", {}).get("decoupled")))


# ---- perf_analyzer's --input-data JSON -----------------------------------------------------------

def bytes_element_b64(data: bytes) -> dict:
    """One BYTES tensor element in perf_analyzer's JSON: base64 of the element as Triton serialises it,
    a 4-byte little-endian length then the bytes (binary video cannot travel as a JSON string)."""
    return {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")}


def input_data(model: ModelInfo, videos: list[bytes], prompt: str, speculative: bool,
               max_tokens: int | None = None) -> dict:
    """perf_analyzer's `--input-data` JSON: one entry per video (sent round-robin), same prompt."""
    if "video" not in model.inputs or "prompt" not in model.inputs:
        raise LoadError(f"model {model.name!r} has no `video`/`prompt` inputs: {sorted(model.inputs)}")
    common: dict = {"prompt": [prompt], model.ab_input: model.ab_value(speculative)}
    if max_tokens is not None:
        if "max_tokens" not in model.inputs:
            raise LoadError(f"model {model.name!r} has no max_tokens input")
        common["max_tokens"] = [max_tokens]
    if "num_frames" in model.inputs and not model.inputs["num_frames"][1]:
        common["num_frames"] = [0]  # a required input on older servers; 0 keeps every frame
    entries = [{"video": bytes_element_b64(v), **common} for v in videos]
    # inputs such as `frames` are the alternative to `video`; any other required one we cannot fill
    missing = [n for n, (_, optional) in model.inputs.items() if not optional and n not in entries[0]]
    if missing:
        raise LoadError(f"model {model.name!r} requires inputs the load test does not fill: {missing}")
    return {"data": entries}


# ---- one measurement ------------------------------------------------------------------------------

@dataclass
class Level:
    """One concurrency level of one mode, as measured."""
    mode: str  # "speculative" or "ar"
    concurrency: int
    requests: int = 0  # requests in the measured windows
    throughput: float = 0.0  # infer/s (perf_analyzer's)
    tokens_per_s: float | None = None  # throughput x mean generated tokens per answer (from each answer's stats)
    p50_ms: float | None = None  # end-to-end latency (request sent -> last response)
    p90_ms: float | None = None
    p99_ms: float | None = None
    ttft_p50_ms: float | None = None  # time to first token (first streamed response), decoupled + streaming only
    ttft_p90_ms: float | None = None
    ttft_p99_ms: float | None = None
    mean_accepted_length: float | None = None
    server_failures: int | None = None  # the ensemble's failed requests on the server during the level
    error: str = ""  # perf_analyzer's error when it stopped (it stops at the first failed request)


def _percentiles(values: list[float]) -> tuple[float, float, float] | tuple[None, None, None]:
    """p50, p90, p99 (linear interpolation), rounded to 0.01."""
    if not values:
        return None, None, None
    return tuple(round(float(x), 2) for x in np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99]))


def parse_csv(path: Path) -> dict[str, str]:
    """perf_analyzer's `-f` CSV holds one row per concurrency level; we run one level per file."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != 1:
        raise LoadError(f"{path}: expected one measurement row, found {len(rows)}")
    return rows[0]


def _final_stats(outputs: list[dict]) -> dict:
    """The answer's statistics: the `stats` JSON of the response that carries one (the last, when streaming)."""
    for out in reversed(outputs):
        s = out.get("stats")
        if isinstance(s, str) and s.startswith("{"):
            return json.loads(s)
    return {}


def parse_profile(path: Path, requests_csv: Path) -> list[dict]:
    """Per-request timings from perf_analyzer's profile export, restricted to the requests it measured
    (those that finished inside its last three windows, the ones its stable measurement merges);
    written to `requests_csv`."""
    # request inputs and outputs are echoed raw, and binary video is not valid UTF-8
    doc = json.loads(path.read_bytes().decode("utf-8", "replace"))
    exp = doc["experiments"][-1]
    bounds = exp["window_boundaries"]
    lo, hi = bounds[max(0, len(bounds) - 4)], bounds[-1]
    rows = []
    for r in exp["requests"]:
        ts = r["response_timestamps"]
        if not ts or not lo <= ts[-1] <= hi:
            continue
        stats = _final_stats(r.get("response_outputs", []))
        rows.append({"start_ms": round((r["timestamp"] - lo) / 1e6, 3),
                     "ttft_ms": round((ts[0] - r["timestamp"]) / 1e6, 3),
                     "latency_ms": round((ts[-1] - r["timestamp"]) / 1e6, 3),
                     "responses": len(ts), "new_tokens": stats.get("new_tokens"),
                     "mean_accepted_length": stats.get("mean_accepted_length")})
    with open(requests_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["start_ms", "ttft_ms", "latency_ms", "responses", "new_tokens",
                                           "mean_accepted_length"])
        w.writeheader()
        w.writerows(rows)
    return rows


def failure_count(metrics_url: str | None, model: str) -> int | None:
    """Triton's `nv_inference_request_failure` for `model` (all versions and reasons); None if unreadable."""
    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith("nv_inference_request_failure{") and f'model="{model}"' in head:
            total += float(value)
    return int(total)


@dataclass(frozen=True)
class Measure:
    """How perf_analyzer measures each level."""
    measurement_ms: int = 5000  # its time window
    request_count: int = 0  # >0: send exactly this many requests and measure them all (no stability search)
    stability_percent: float = 10.0  # its default
    max_trials: int = 10  # its default


def run_level(pa: PerfAnalyzer, url: str, model: ModelInfo, data_json: Path, mode: str, concurrency: int,
              streaming: bool, measure: Measure, out: Path, metrics_url: str | None) -> tuple[Level, list[str]]:
    """One perf_analyzer run at one concurrency level; its raw CSV and per-request CSV go into `out`."""
    stem = f"{mode}_c{concurrency}"
    raw_csv = out / f"perf_analyzer_{stem}.csv"
    with tempfile.TemporaryDirectory() as tmp:
        # the profile export echoes every request's inputs (the whole video), so it stays out of the report
        profile = Path(tmp) / "profile.json"
        args = ["-m", model.name, "-u", url, "-i", "grpc", "--input-data", str(data_json),
                "--concurrency-range", str(concurrency), "-f", str(raw_csv), "--profile-export-file", str(profile)]
        if streaming:
            args += ["--async", "--streaming"]  # perf_analyzer measures decoupled models only this way
        if measure.request_count:
            args += ["--request-count", str(measure.request_count)]
        else:
            args += ["-p", str(measure.measurement_ms), "-s", str(measure.stability_percent),
                     "-r", str(measure.max_trials)]
        failed_before = failure_count(metrics_url, model.name)
        res = pa.run(args)
        # as recorded in commands.txt: the temporary profile path would mislead a reader rerunning it
        args[args.index(str(profile))] = f"profile_{stem}.json"
        failed_after = failure_count(metrics_url, model.name)
        (out / f"perf_analyzer_{stem}.log").write_text(res.stdout + res.stderr)
        level = Level(mode, concurrency)
        if failed_before is not None and failed_after is not None:
            level.server_failures = failed_after - failed_before
        if res.returncode != 0 or not raw_csv.exists():
            lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
            level.error = " / ".join(lines[-3:]) or f"perf_analyzer exited {res.returncode}"  # no `|`: a table cell
            return level, args
        row = parse_csv(raw_csv)
        reqs = parse_profile(profile, out / f"requests_{stem}.csv")
    level.requests = len(reqs)
    level.throughput = round(float(row["Inferences/Second"]), 3)
    # Latencies from the profile export, one method for both: perf_analyzer's CSV times a decoupled model's
    # first response only (its TTFT), never the whole answer
    level.p50_ms, level.p90_ms, level.p99_ms = _percentiles([r["latency_ms"] for r in reqs])
    if model.decoupled and streaming:
        level.ttft_p50_ms, level.ttft_p90_ms, level.ttft_p99_ms = _percentiles([r["ttft_ms"] for r in reqs])
    tokens = [r["new_tokens"] for r in reqs if r["new_tokens"] is not None]
    if tokens and len(tokens) == len(reqs):
        level.tokens_per_s = round(level.throughput * float(np.mean(tokens)), 1)
    accepted = [r["mean_accepted_length"] for r in reqs if r["mean_accepted_length"]]
    if accepted:
        level.mean_accepted_length = round(float(np.mean(accepted)), 3)
    return level, args


# ---- the sweep ------------------------------------------------------------------------------------

@dataclass
class SweepConfig:
    url: str
    videos: list[Path]
    prompt: str
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    measure: Measure = Measure()
    ab: bool = False  # also sweep with speculative decoding off, and report the speedup
    streaming: bool | None = None  # None: stream exactly when the model is decoupled
    max_tokens: int | None = None  # None: the server's default
    out: Path = Path("runs/load")
    model: str = "sparrow"
    perf_analyzer: str | None = None
    metrics_url: str | None = None  # Triton's metrics endpoint, for server-side failures per level


@dataclass
class SweepReport:
    config: dict
    perf_analyzer: str
    streaming: bool
    decoupled: bool
    levels: list[Level]

    @property
    def ok(self) -> bool:
        return all(not lv.error and not lv.server_failures for lv in self.levels)


def default_metrics_url(url: str) -> str | None:
    """Triton's default port layout (gRPC 8001, metrics 8002) lets the metrics URL follow from --url; on
    other ports guessing could read a different server's counters, so it must be given."""
    host, _, port = url.rpartition(":")
    return f"http://{host}:8002/metrics" if port == "8001" and host else None


def run_sweep(cfg: SweepConfig, progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> SweepReport:
    pa = find_perf_analyzer(cfg.perf_analyzer)
    model = model_info(cfg.url, cfg.model)
    streaming = model.decoupled if cfg.streaming is None else cfg.streaming
    if model.decoupled and not streaming:
        raise LoadError(f"model {model.name!r} is decoupled (it streams its answer): perf_analyzer measures it "
                        "only over the gRPC streaming API; drop --no-streaming")
    cfg.out.mkdir(parents=True, exist_ok=True)
    videos = [Path(v).read_bytes() for v in cfg.videos]
    modes = [("speculative", True)] + ([("ar", False)] if cfg.ab else [])
    data = {}
    for mode, speculative in modes:
        data[mode] = cfg.out / f"input_data_{mode}.json"
        data[mode].write_text(json.dumps(input_data(model, videos, cfg.prompt, speculative, cfg.max_tokens)))
    metrics_url = cfg.metrics_url or default_metrics_url(cfg.url)
    progress(f"perf_analyzer {pa.binary} -> {cfg.url} model {model.name} "
             f"({'streaming' if streaming else 'not streaming'}; {len(videos)} video(s); "
             f"levels {cfg.concurrency}{'; A/B speculative vs ar' if cfg.ab else ''})")
    levels, commands = [], []
    # A/B interleaved per level, so slow drift on a shared machine hits both modes alike
    for c in cfg.concurrency:
        for mode, _ in modes:
            progress(f"  [{mode}] concurrency {c}: measuring ...")
            t0 = time.monotonic()
            level, args = run_level(pa, cfg.url, model, data[mode], mode, c, streaming, cfg.measure, cfg.out,
                                    metrics_url)
            commands.append(" ".join([str(pa.binary), *args]))
            levels.append(level)
            if level.error:
                progress(f"  [{mode}] concurrency {c}: FAILED: {level.error}")
                break
            ttft = f", TTFT p90 {level.ttft_p90_ms} ms" if level.ttft_p90_ms is not None else ""
            progress(f"  [{mode}] concurrency {c}: {level.throughput} infer/s, p90 {level.p90_ms} ms{ttft}, "
                     f"{level.requests} requests ({time.monotonic() - t0:.0f} s)")
        if levels and levels[-1].error:
            break  # the server is failing requests: further levels would only repeat the error
    (cfg.out / "commands.txt").write_text("\n".join(commands) + "\n")
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    conf["videos"] = [str(v) for v in cfg.videos]
    report = SweepReport(conf, str(pa.binary), streaming, model.decoupled, levels)
    write_report(report, cfg.out)
    return report


# ---- the report -----------------------------------------------------------------------------------

def _fmt(x) -> str:
    return "n/a" if x is None else str(x)


def report_table(report: SweepReport) -> str:
    by = {(lv.mode, lv.concurrency): lv for lv in report.levels}
    ab = any(lv.mode == "ar" for lv in report.levels)
    head = ["mode", "concurrency", "requests", "infer/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms",
            "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "mean accepted", "server failures"]
    if ab:
        head.append("speedup (infer/s vs ar)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in report.levels:
        if lv.error:
            lines.append(f"| {lv.mode} | {lv.concurrency} | FAILED: {lv.error} |")
            continue
        cells = [lv.mode, lv.concurrency, lv.requests, lv.throughput, lv.tokens_per_s, lv.p50_ms, lv.p90_ms,
                 lv.p99_ms, lv.ttft_p50_ms, lv.ttft_p90_ms, lv.ttft_p99_ms, lv.mean_accepted_length,
                 lv.server_failures]
        if ab:
            base = by.get(("ar", lv.concurrency))
            speedup = (round(lv.throughput / base.throughput, 2)
                       if lv.mode == "speculative" and base and base.throughput and not base.error else None)
            cells.append(f"{speedup}x" if speedup else "")
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def write_report(report: SweepReport, out: Path) -> None:
    (out / "report.json").write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=1) + "\n")
    c = report.config
    how = (f"{c['measure']['request_count']} requests per level" if c["measure"]["request_count"] else
           f"{c['measure']['measurement_ms']} ms windows until stable within {c['measure']['stability_percent']}%")
    notes = [
        f"# Load test: {c['model']} at {c['url']}",
        "",
        f"perf_analyzer (`{report.perf_analyzer}`), gRPC, "
        f"{'streaming' if report.streaming else 'not streaming'}, {how}; inputs: "
        f"{', '.join(Path(v).name for v in c['videos'])} round-robin, prompt {c['prompt']!r}"
        f"{', max_tokens ' + str(c['max_tokens']) if c['max_tokens'] else ''}.",
        "",
        report_table(report),
        "",
        "- infer/s: perf_analyzer's throughput (requests answered per second). tokens/s: infer/s times the "
        "mean number of generated tokens per answer (each answer's stats).",
        "- p50/p90/p99: end-to-end latency, request sent to last response; TTFT: request sent to the first "
        "streamed response (the first token's text). Both from perf_analyzer's profile export (per-request "
        "timestamps of the measured requests), linear-interpolated percentiles, so they can differ a little "
        "from the ones perf_analyzer prints."
        + ("" if report.decoupled and report.streaming else " TTFT n/a: the answer comes back whole."),
        "- With --request-count, perf_analyzer's throughput is coarse (it checks for completion about once a "
        "second); the time-window mode measures it properly." if c["measure"]["request_count"] else "",
        "- speedup: speculative infer/s over plain autoregressive (`ar`) infer/s at the same concurrency, "
        "levels measured back to back." if any(lv.mode == "ar" for lv in report.levels) else "",
        "- server failures: the ensemble's failed requests on the server during the level (Triton's "
        "`nv_inference_request_failure`); n/a without a metrics URL. perf_analyzer itself stops at the "
        "first failed request.",
        "- Files: `perf_analyzer_*.csv` (raw), `requests_*.csv` (per request), `perf_analyzer_*.log`, "
        "`commands.txt` (to rerun a level by hand), `input_data_*.json`, `report.json`, "
        "`throughput_latency.png`.",
    ]
    (out / "report.md").write_text("\n".join(n for n in notes if n is not None) + "\n")
    plot(report, out / "throughput_latency.png")


def plot(report: SweepReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mode in dict.fromkeys(lv.mode for lv in report.levels):
        pts = [lv for lv in report.levels if lv.mode == mode and not lv.error]
        if not pts:
            continue
        line, = ax.plot([p.throughput for p in pts], [p.p90_ms for p in pts], marker="o", label=f"{mode} p90")
        if all(p.ttft_p90_ms is not None for p in pts):
            ax.plot([p.throughput for p in pts], [p.ttft_p90_ms for p in pts], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{mode} TTFT p90")
        for p in pts:
            ax.annotate(f"c={p.concurrency}", (p.throughput, p.p90_ms), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xlabel("throughput (infer/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{report.config['model']}: throughput vs p90 latency")
    ax.grid(alpha=0.3)
    if ax.lines:  # nothing to label when every level failed
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the soak ------------------------------------------------------------------------------------

@dataclass
class SoakConfig:
    url: str
    videos: list[Path]
    prompt: str
    duration_s: float = 300.0
    concurrency: int = 8
    max_requests: int = 100_000  # the count bound beside the time bound
    max_tokens: int | None = None  # None: the client's default
    speculative: bool = True
    timeout_s: float = 300.0  # per request
    model: str = "sparrow"


@dataclass
class SoakReport:
    config: dict
    requests: int = 0
    answered: int = 0
    failed: int = 0
    mismatched: int = 0
    elapsed_s: float = 0.0
    throughput: float = 0.0  # answers per second
    p50_ms: float | None = None  # end-to-end, client side
    p90_ms: float | None = None
    p99_ms: float | None = None
    first_piece_p90_ms: float | None = None  # request sent -> first streamed text piece, client side
    examples: list[dict] = field(default_factory=list)  # the first failures and mismatches, for a reader

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.failed == 0 and self.mismatched == 0


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_soak(cfg: SoakConfig, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
             max_examples: int = 20) -> SoakReport:
    """Greedy answers must not change under load: take each input's answer from a lone request, then send
    requests from `concurrency` threads until `duration_s` or `max_requests`, comparing every answer."""
    videos = [Path(v).read_bytes() for v in cfg.videos]
    kw = {"speculative": cfg.speculative}
    if cfg.max_tokens is not None:
        kw["max_tokens"] = cfg.max_tokens
    conf = {**asdict(cfg), "videos": [str(v) for v in cfg.videos]}
    report, lock = SoakReport(conf), threading.Lock()
    latencies, first_pieces = [], []
    with SparrowClient(cfg.url, model=cfg.model, timeout_s=cfg.timeout_s) as client:
        reference = []
        for path, video in zip(cfg.videos, videos):
            try:
                reference.append(client.infer(video, cfg.prompt, **kw))
            except SparrowServerError as e:
                raise LoadError(f"the single-request answer for {path} failed: {e}") from e
        progress(f"soak: {len(videos)} reference answer(s) taken alone; now {cfg.concurrency} concurrent "
                 f"requests for {cfg.duration_s:g} s (at most {cfg.max_requests})")
        t0 = time.monotonic()
        deadline = t0 + cfg.duration_s

        def example(kind: str, i: int, **detail) -> None:
            if len(report.examples) < max_examples:
                report.examples.append({"kind": kind, "request": i, "video": str(cfg.videos[i % len(videos)]),
                                        **detail})

        def worker() -> None:
            while True:
                with lock:
                    if report.requests >= cfg.max_requests or time.monotonic() >= deadline:
                        return
                    i = report.requests
                    report.requests += 1
                want = reference[i % len(videos)]
                try:
                    got = client.infer(videos[i % len(videos)], cfg.prompt, **kw)
                except SparrowServerError as e:
                    with lock:
                        report.failed += 1
                        example("failed", i, error=f"{type(e).__name__} ({e.status}): {e}")
                    continue
                with lock:
                    report.answered += 1
                    latencies.append(got.total_s)
                    if got.first_piece_s is not None:
                        first_pieces.append(got.first_piece_s)
                    if got.token_ids != want.token_ids or got.text != want.text:
                        report.mismatched += 1
                        example("mismatch", i, first_different_token=_first_difference(got.token_ids, want.token_ids),
                                expected=want.text, got=got.text)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(cfg.concurrency)]
        for t in threads:
            t.start()
        next_progress = t0 + 10.0
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            if time.monotonic() >= next_progress:
                next_progress += 10.0
                with lock:
                    progress(f"soak: {time.monotonic() - t0:.0f} s, {report.requests} sent, {report.answered} "
                             f"answered, {report.failed} failed, {report.mismatched} mismatched")
    report.elapsed_s = round(time.monotonic() - t0, 2)
    report.throughput = round(report.answered / report.elapsed_s, 3) if report.elapsed_s else 0.0
    report.p50_ms, report.p90_ms, report.p99_ms = _percentiles([s * 1e3 for s in latencies])
    report.first_piece_p90_ms = _percentiles([s * 1e3 for s in first_pieces])[1]
    return report


# ---- the command line ----------------------------------------------------------------------------

def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return levels


def cmd_load(a) -> int:
    out = Path(a.out) if a.out else Path("runs") / "load" / time.strftime("%Y%m%d-%H%M%S")
    try:
        if a.duration is not None:
            if len(a.concurrency) != 1:
                raise LoadError(f"a soak (--duration) runs at one concurrency, got {a.concurrency}")
            report = run_soak(SoakConfig(a.url, a.video, a.prompt, a.duration, a.concurrency[0], a.max_requests,
                                         a.max_tokens, speculative=True, timeout_s=a.timeout, model=a.model))
            out.mkdir(parents=True, exist_ok=True)
            (out / "soak.json").write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=1) + "\n")
            print(f"soak: {report.requests} requests in {report.elapsed_s} s ({report.throughput} answers/s), "
                  f"{report.failed} failed, {report.mismatched} answers differing from the single-request answer; "
                  f"latency p50/p90/p99 {report.p50_ms}/{report.p90_ms}/{report.p99_ms} ms, first piece p90 "
                  f"{report.first_piece_p90_ms} ms -> {out / 'soak.json'}")
            for ex in report.examples:
                print(f"  {json.dumps(ex)}")
            return 0 if report.ok else 1
        cfg = SweepConfig(a.url, a.video, a.prompt, a.concurrency,
                          Measure(a.measurement_ms, a.request_count, a.stability_percent), a.ab, a.streaming,
                          a.max_tokens, out, a.model, a.perf_analyzer, a.metrics_url)
        report = run_sweep(cfg)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report_table(report))
    print(f"report: {out / 'report.md'}  plot: {out / 'throughput_latency.png'}")
    return 0 if report.ok else 1


def add_parser(sub) -> argparse.ArgumentParser:
    """The `load` subcommand of `sparrow-client`."""
    p = sub.add_parser(
        "load", help="load-test the server: perf_analyzer concurrency sweep (optionally A/B), or a soak",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="\n\n".join(textwrap.fill(par, 100) for par in (
            "Sweep: runs perf_analyzer (from tritonclient 2.51: pip install 'sparrow-client[load]'; on "
            "Debian/Ubuntu also apt-get install libb64-0d) once per concurrency level with the given videos as "
            "its --input-data, and writes a report directory: report.md (throughput, tokens/s, p50/p90/p99 "
            "latency, time to first token when the model streams, server failures), report.json, the raw CSVs "
            "and throughput_latency.png. --ab adds the same sweep with speculative decoding off and a speedup "
            "column.",
            "Soak (--duration): sends requests from --concurrency threads for that long (or --max-requests), "
            "compares every answer with the same input's single-request greedy answer, and exits 1 on any "
            "failure or difference.")),
        epilog="examples:\n"
               "  sparrow-client load --url localhost:8001 --video a.mp4 --video b.mp4 "
               "--prompt 'describe the video .' --concurrency 1,2,4,8 --ab --out runs/load\n"
               "  sparrow-client load --url localhost:8001 --video a.mp4 --prompt 'describe the video .' "
               "--duration 300 --concurrency 8")
    p.add_argument("--url", default="localhost:8001", help="the server's gRPC endpoint (default: localhost:8001)")
    p.add_argument("--video", action="append", required=True, type=Path, metavar="FILE",
                   help="a video file sent whole; repeat for several (sent round-robin)")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8], metavar="N[,N...]",
                   help="comma-separated concurrency levels (default 1,2,4,8); one level for a soak")
    p.add_argument("--max-tokens", type=int, help="tokens per answer (default: the server's / client's default)")
    p.add_argument("--out", metavar="DIR", help="report directory (default: runs/load/<date-time>)")
    p.add_argument("--model", default="sparrow", help="the ensemble's name (default: sparrow)")
    g = p.add_argument_group("sweep (perf_analyzer)")
    g.add_argument("--ab", action="store_true", help="also sweep with speculative decoding off; adds a speedup column")
    g.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="use the gRPC streaming API (default: exactly when the model is decoupled, i.e. streams; "
                        "time to first token is measured only then)")
    g.add_argument("--measurement-ms", type=int, default=5000,
                   help="perf_analyzer's measurement window; it measures until 3 windows agree (default 5000)")
    g.add_argument("--stability-percent", type=float, default=10.0,
                   help="how far 3 windows may differ and still count as stable (default 10; raise it on a "
                        "busy machine)")
    g.add_argument("--request-count", type=int, default=0,
                   help="instead of windows: send exactly this many requests per level and measure them all")
    g.add_argument("--perf-analyzer", help="the perf_analyzer binary (default: beside this Python, else on PATH)")
    g.add_argument("--metrics-url", help="Triton's metrics endpoint, for server-side failures per level (default: "
                                         "http://HOST:8002/metrics when --url uses port 8001)")
    s = p.add_argument_group("soak")
    s.add_argument("--duration", type=float, help="run a soak for this many seconds instead of a sweep")
    s.add_argument("--max-requests", type=int, default=100_000, help="stop the soak after this many requests")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds one soak request may take")
    p.set_defaults(fn=cmd_load)
    return p
