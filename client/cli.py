"""`sparrow-client`: call a Sparrow Triton server over gRPC (no torch needed)."""

from __future__ import annotations

import argparse
import json
import sys

from .api import Connection, RetryPolicy, SparrowClient, SparrowServerError
from .load import add_parser as add_load_parser


def _client(a) -> SparrowClient:
    conn = Connection(a.url, ssl=a.ssl, root_certificates=a.root_certificates, private_key=a.private_key,
                      certificate_chain=a.certificate_chain, headers=dict(a.header) or None)
    return SparrowClient(timeout_s=a.timeout, retry=RetryPolicy(attempts=a.retries + 1), connection=conn)


def _summary(ans) -> str:
    """One line: tokens/s, mean accepted length, time to first piece, prefill."""
    s = ans.stats
    line = f"[{s.get('strategy')}] {s.get('new_tokens')} tokens, {s.get('tokens_per_s')} tok/s"
    if s.get("mean_accepted_length"):
        line += (f", mean accepted length {s['mean_accepted_length']}, draft {s['draft_ms_per_step']} ms"
                 f" / verify {s['verify_ms_per_step']} ms per step")
    first = f", first piece {ans.first_piece_s:.3f} s" if ans.first_piece_s is not None else ""
    return line + f", prefill {s.get('prefill_s')} s ({s.get('visual_tokens')} visual tokens){first}"


def cmd_infer(a) -> int:
    kw = dict(max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed, num_frames=a.num_frames,
              speculative=a.speculative)
    with _client(a) as client:
        try:
            if a.stream and not a.json:
                for item in client.stream(a.video, a.prompt, **kw):
                    if isinstance(item, str):
                        print(item, end="", flush=True)
                ans = item
                print()
            else:
                ans = client.infer(a.video, a.prompt, **kw)
        except SparrowServerError as e:
            print(f"error ({type(e).__name__}, {e.status}): {e}", file=sys.stderr)
            return 1
    if a.json:
        print(json.dumps({"text": ans.text, "token_ids": ans.token_ids, "stats": ans.stats}))
        return 0
    if not a.stream:
        print(ans.text)
    print(_summary(ans), file=sys.stderr)
    return 0


def cmd_health(a) -> int:
    with _client(a) as client:
        try:
            h = client.health()
        except SparrowServerError as e:
            print(f"error ({type(e).__name__}, {e.status}): {e}", file=sys.stderr)
            return 1
    if a.json:
        print(json.dumps({"live": h.live, "ready": h.ready, "version": h.version, "models": h.models}))
    else:
        print(f"server {a.url}: live {h.live}, ready {h.ready}, Triton {h.version}")
        for name, ready in sorted(h.models.items()):
            print(f"  {name:16s} {'READY' if ready else 'NOT READY'}")
    return 0 if h.live and h.ready and all(h.models.values()) else 2


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="localhost:8001", help="the server's gRPC endpoint (default: localhost:8001)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the whole answer")
    p.add_argument("--retries", type=int, default=3,
                   help="retries with exponential backoff while the server is UNAVAILABLE (default: 3)")
    p.add_argument("--header", type=_header, action="append", default=[], metavar="KEY=VALUE",
                   help="a gRPC metadata header sent with every call (repeatable)")
    p.add_argument("--ssl", action="store_true", help="TLS (with the PEM files below where needed)")
    p.add_argument("--root-certificates", default=None, help="PEM file of the CA that signed the server")
    p.add_argument("--private-key", default=None, help="PEM private key (mutual TLS)")
    p.add_argument("--certificate-chain", default=None, help="PEM certificate chain (mutual TLS)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparrow-client", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("infer", help="answer a question about a video file")
    p.add_argument("--video", required=True, help="video file (mp4/webm), sent whole")
    p.add_argument("--prompt", required=True)
    p.add_argument("--stream", action="store_true", help="print the answer's pieces as they arrive")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=True,
                   help="Sparrow speculative decoding (default); --no-speculative: plain autoregressive")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--num-frames", type=int, default=0, help="sample this many frames (0: every frame)")
    _add_connection_args(p)
    p.set_defaults(fn=cmd_infer)

    p = sub.add_parser("health", help="server liveness and readiness, each model's readiness, server version "
                                      "(exit 0 all ready, 2 not ready, 1 unreachable)")
    _add_connection_args(p)
    p.set_defaults(fn=cmd_health)

    add_load_parser(sub)
    return ap


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
