"""`sparrow-client`: call a Sparrow Triton server over gRPC (no torch needed)."""

from __future__ import annotations

import argparse
import json
import sys

from .api import SparrowClient, SparrowServerError


def cmd_infer(a) -> int:
    with SparrowClient(a.url, timeout_s=a.timeout) as client:
        try:
            ans = client.infer(a.video, a.prompt, strategy=a.strategy, max_tokens=a.max_tokens,
                               num_frames=a.num_frames)
        except SparrowServerError as e:
            print(f"error ({e.status}): {e}", file=sys.stderr)
            return 1
    if a.json:
        print(json.dumps({"text": ans.text, "token_ids": ans.token_ids, "stats": ans.stats}))
        return 0
    s = ans.stats
    print(ans.text)
    line = f"[{s.get('strategy')}] {s.get('new_tokens')} tokens, {s.get('tokens_per_s')} tok/s"
    if s.get("mean_accepted_length"):
        line += (f", mean accepted length {s['mean_accepted_length']}, draft {s['draft_ms_per_step']} ms"
                 f" / verify {s['verify_ms_per_step']} ms per step")
    print(line + f", prefill {s.get('prefill_s')} s ({s.get('visual_tokens')} visual tokens)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparrow-client", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("infer", help="answer a question about a video file")
    p.add_argument("--video", required=True, help="video file (mp4/webm), sent whole")
    p.add_argument("--prompt", required=True)
    p.add_argument("--url", default="localhost:8001", help="the server's gRPC endpoint (default: localhost:8001)")
    p.add_argument("--strategy", choices=("sparrow", "ar"), default="sparrow",
                   help="sparrow: speculative decoding with the Sparrow draft; ar: plain autoregressive")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=0, help="sample this many frames (0: every frame)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats)")
    p.set_defaults(fn=cmd_infer)
    return ap


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
