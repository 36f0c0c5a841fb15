"""`sparrow`: one command line for the toolkit (demo data, training, evaluation, generation)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .tree_spec import spec_key


def _add_model_arg(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: the embedded demo target)")


def _load_target(model: str | None):
    from .demo.model import DEMO_TARGET_DIR
    from .target import Target

    path = Path(model) if model else DEMO_TARGET_DIR
    if model is None and not (path / "model.safetensors").is_file():
        sys.exit(f"error: the embedded demo target is missing at {path}; "
                 "run `sparrow train target --out sparrow/assets/demo_target`")
    return Target.load(path)


def cmd_demo_video(a):
    from .demo.data import DEFAULT_FRAMES
    from .demo.model import DEMO_TARGET_DIR
    from .demo.text import caption, questions
    from .demo.world import frames_for_visual_tokens, make_scene, render
    from .evaluate import trained_with_echo
    from .video import encode

    frames, side = frames_for_visual_tokens(a.visual_tokens) if a.visual_tokens else (DEFAULT_FRAMES, a.side)
    scene = make_scene(a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode(render(scene, frames, side, side)))
    qs = questions(scene, trained_with_echo(DEMO_TARGET_DIR))  # answers in the form the embedded target gives
    q = next((x for x in qs if x.kind == a.question_kind), qs[0])
    meta = {"seed": a.seed, "num_frames": frames, "height": side, "width": side,
            "visual_tokens": frames // 2 * (side // 16) ** 2, "caption": caption(scene),
            "question": q.question, "answer": q.answer, "questions": [x.__dict__ for x in qs],
            "scene": scene.to_json()}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {out} ({frames} frames, {side}x{side}, {meta['visual_tokens']} visual tokens) "
          f"and {out.with_suffix('.json')}\nquestion: {q.question}  answer: {q.answer}")


def cmd_train_target(a):
    from .train_target import TargetTrainConfig, train_target

    given = {k: v for k, v in (("steps", a.steps), ("batch_size", a.batch_size)) if v is not None}
    try:
        recipe = json.loads(Path(a.config).read_text()) if a.config else {}
        cfg = TargetTrainConfig.from_json({**recipe, "seed": a.seed, **given})
    except (OSError, ValueError, TypeError) as e:
        sys.exit(f"error: target training settings{f' in {a.config}' if a.config else ''}: {e}")
    rec = train_target(cfg, a.work_dir, a.out)
    print(json.dumps(rec if a.json else {k: rec[k] for k in ("train_seconds", "final_loss")}))


def cmd_train_draft(a):
    from .draft import DraftConfig
    from .draft_data import DraftDataConfig
    from .train_draft import DraftTrainConfig, train_draft

    target = _load_target(a.model)
    text = target.model.config.text_config
    glimpses = 0 if a.attend == "prefix" else a.glimpses
    draft = DraftConfig(hidden_size=text.hidden_size, vocab_size=text.vocab_size, attend=a.attend, window=a.window,
                        glimpses=glimpses, glimpse_layer=a.glimpse_layer,
                        num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
                        intermediate_size=text.intermediate_size,
                        feature_layers=(1, text.num_hidden_layers // 2, text.num_hidden_layers))
    data = DraftDataConfig(examples=a.examples, seed=a.seed, feature_layers=draft.feature_layers,
                           long_examples=a.long_examples,
                           **({"long_videos": a.long_videos} if a.long_videos else {}))
    cfg = DraftTrainConfig(draft=draft, data=data, steps=a.steps, batch_size=a.batch_size,
                           mtp_steps=a.mtp_steps, seed=a.seed, long_steps=a.long_steps)
    rec = train_draft(target, cfg, a.data_dir, a.work_dir, a.out, init=a.init)
    print(json.dumps(rec if a.json else {k: rec[k] for k in ("train_seconds", "final_loss", "holdout", "holdout_long")
                                           if k in rec}))


def _load_draft(path: str | None, target, strategy: str):
    from .demo.model import DEMO_DRAFTS
    from .draft import Draft

    where = Path(path) if path else DEMO_DRAFTS[strategy]
    if not (where / "draft_config.json").is_file():
        sys.exit(f"error: no {strategy} draft at {where} (give --draft, or train one with `sparrow train draft`)")
    draft = Draft.load(where, target.model)
    want = "prefix" if strategy == "eagle" else "window"
    if draft.cfg.attend != want:
        sys.exit(f"error: {where} holds a {draft.cfg.attend!r} draft; --strategy {strategy} needs {want!r}")
    return draft


def cmd_eval_target(a):
    from .demo.model import DEMO_TARGET_DIR
    from .demo.world import frames_for_visual_tokens
    from .evaluate import eval_binding, eval_captions, eval_target, trained_with_echo

    if a.videos < 1 or a.binding < 0 or a.captions < 0:
        sys.exit(f"error: --videos must be >= 1 and --binding, --captions >= 0, got {a.videos}, {a.binding}, "
                 f"{a.captions}")
    try:
        frames_for_visual_tokens(a.caption_visual_tokens)  # before minutes of question answering
    except ValueError as e:
        sys.exit(f"error: --caption-visual-tokens: {e}")
    target = _load_target(a.model)
    echo = trained_with_echo(a.model or DEMO_TARGET_DIR)
    res = eval_target(target.model, target.tokenizer, videos=a.videos, seed=a.seed, echo=echo)
    bind = (eval_binding(target.model, target.tokenizer, videos=a.binding, seed=a.seed, echo=echo)
            if a.binding else None)
    caps = (eval_captions(target.model, target.tokenizer, videos=a.captions, visual_tokens=a.caption_visual_tokens,
                          seed=a.seed) if a.captions else None)
    if a.json:
        print(json.dumps({**res.to_json(), **({"binding": bind.to_json()} if bind else {}),
                          **({"captions": caps.to_json()} if caps else {})}))
        return
    print(f"videos: {res.videos}\nanswer accuracy: {res.accuracy:.1%} (bar: >= 90%)\n"
          f"blank-frame accuracy: {res.blank_accuracy:.1%} (bar: < 40%)")
    for k, v in res.by_kind.items():
        print(f"  {k:14s} {v:.1%}")
    if bind:
        print(f"binding: asked the colour of each shape of {bind.videos} videos of 2+ shapes, the answer changed "
              f"with the asked shape in {bind.changed}; {bind.accuracy:.1%} right")
    if caps:
        print(f"captions at {caps.visual_tokens} visual tokens ({caps.videos} videos): {caps.prefix_share:.1%} of the "
              f"ground truth's words matched from the start, {caps.exact:.1%} exact")


def cmd_generate(a):
    from .generate import generate_ar
    from .video import VideoError, decode

    prompt = a.prompt
    sidecar = Path(a.video).with_suffix(".json")
    if prompt is None:
        if not sidecar.is_file():
            sys.exit("error: --prompt is required (no demo sidecar JSON next to the video)")
        prompt = json.loads(sidecar.read_text())["question"]
    try:
        frames = decode(a.video, num_frames=a.num_frames)
    except VideoError as e:
        sys.exit(f"error: {e}")
    target = _load_target(a.model)
    try:
        prepared = target.prepare(frames, prompt)  # sizes the runtime's cache, then reused by the decoder
    except ValueError as e:
        sys.exit(f"error: {e}")
    if a.strategy != "ar" and a.runtime != "sparrow":
        sys.exit(f"error: --strategy {a.strategy} runs on the sparrow runtime only")
    from .speculative import TokenTree, generate_speculative

    try:
        tree = TokenTree.static(a.draft_len, a.tree_width)
    except ValueError as e:
        sys.exit(f"error: {e}")
    engine = target
    if a.runtime == "sparrow":
        from .runtime import Runtime

        engine = Runtime(target, max_len=prepared.input_ids.shape[1] + a.max_new_tokens + tree.size + 1)
    try:
        if a.strategy == "ar":
            res = generate_ar(engine, frames, prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                              seed=a.seed, min_new_tokens=a.min_new_tokens, prepared=prepared)
        else:
            res = generate_speculative(engine, _load_draft(a.draft, target, a.strategy), frames, prompt, tree,
                                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                                       min_new_tokens=a.min_new_tokens, prepared=prepared)
    except ValueError as e:
        sys.exit(f"error: {e}")
    res.stats["runtime"] = a.runtime
    if a.json:
        print(json.dumps(res.to_json()))
    else:
        print(f"Q: {prompt}\nA: {res.text}")
        s = res.stats
        spec = (f", {s['mean_accepted_length']} tokens per target step" if s.get("mean_accepted_length") else "")
        print(f"[{s['strategy']}] {s['new_tokens']} tokens, {s['tokens_per_s']} tok/s{spec}, "
              f"prefill {s['prefill_s']} s over {s['prompt_tokens']} tokens ({s['visual_tokens']} visual)",
              file=sys.stderr)


def cmd_serve(a):
    import signal

    from .serving import EngineDirError, GrpcTls, ServeConfig, backend_missing, start_server, trtllm_engine_dir

    # limits given on the command line win over the engine directory's (or the defaults)
    given = {k: v for k, v in (("max_frames", a.max_frames), ("draft_len", a.draft_len), ("max_len", a.max_len))
             if v is not None}
    given.update(max_video_bytes=int(a.max_video_mb * (1 << 20)), max_tokens_limit=a.max_tokens_limit)
    missing = backend_missing(a.backend, Path(a.engines) if a.engines else None)
    if missing:
        sys.exit(f"error: {missing}")
    if a.backend == "tensorrt_llm":
        given["trtllm_engine"] = str(trtllm_engine_dir(Path(a.engines)).resolve())
    try:
        cfg = ServeConfig.from_engines(a.engines, **given) if a.engines else ServeConfig(**given)
    except EngineDirError as e:
        sys.exit(f"error: {e}")
    if bool(a.grpc_tls_cert) != bool(a.grpc_tls_key) or (a.grpc_tls_client_ca and not a.grpc_tls_cert):
        sys.exit("error: --grpc-tls-cert and --grpc-tls-key go together (and --grpc-tls-client-ca needs them)")
    tls = GrpcTls(Path(a.grpc_tls_cert), Path(a.grpc_tls_key),
                  Path(a.grpc_tls_client_ca) if a.grpc_tls_client_ca else None) if a.grpc_tls_cert else None
    try:
        server = start_server(Path(a.work_dir), cfg, http_port=a.http_port, grpc_port=a.grpc_port,
                              metrics_port=a.metrics_port, grpc_tls=tls)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # A shell starts `sparrow serve &` with SIGINT ignored, and Python keeps an inherited SIG_IGN: claim
    # SIGINT back so `kill -INT` stops the server as Ctrl-C does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(f"starting tritonserver (log: {server.log}) ...", file=sys.stderr)
        server.wait_ready(a.ready_timeout)
        print(f"READY: gRPC localhost:{a.grpc_port}  HTTP localhost:{a.http_port}  "
              f"metrics http://localhost:{a.metrics_port}/metrics  model: sparrow\n"
              f"try: sparrow-client infer --url localhost:{a.grpc_port} --video runs/sample.mp4 --prompt '...'",
              flush=True)
        server.process.wait()
        sys.exit(f"error: tritonserver exited with code {server.process.returncode}; log: {server.log}")
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping tritonserver ...", file=sys.stderr)
        print(f"stopped (exit code {server.stop()})", file=sys.stderr)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _frames_by_side(text: str) -> tuple[tuple[int, int], ...]:
    """'96x256,128x128' -> ((96, 256), (128, 128))"""
    try:
        pairs = tuple(tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item.strip())
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected FRAMESxSIDE pairs like 96x256,128x128, got {text!r}")
    return pairs


def _bench(module, cfg, out: str | None) -> None:
    """Run a benchmark module (run_bench, table, write), print its table, write its files."""
    rows = module.run_bench(cfg)
    print(module.table(rows))
    if out:
        module.write(rows, cfg, out)
        print(f"wrote {out} (and the markdown table, and any plot, beside it)")


def cmd_bench_runtime(a):
    from .benchmarks import runtime

    _bench(runtime, runtime.RuntimeBenchConfig(visual_tokens=a.visual_tokens, draft_len=a.draft_len,
                                               repeats=a.repeats, model=a.model, threads=a.threads), a.json)


def cmd_bench_speedup(a):
    from .benchmarks import speedup

    cfg = speedup.SpeedupBenchConfig(visual_tokens=a.visual_tokens, strategies=a.strategies, videos=a.videos,
                             max_new_tokens=a.max_new_tokens, min_new_tokens=0 if a.natural_stop else None,
                             draft_len=a.draft_len, tree_width=a.tree_width,
                             model=a.model, sparrow_draft=a.sparrow_draft, eagle_draft=a.eagle_draft,
                             threads=a.threads)
    _bench(speedup, cfg, a.json)


def cmd_bench_acceptance(a):
    from .benchmarks import acceptance
    from .demo.model import DEMO_DRAFTS

    drafts = dict(a.drafts) if a.drafts else DEMO_DRAFTS
    cfg = acceptance.AcceptanceBenchConfig(drafts=drafts, visual_tokens=a.visual_tokens, videos=a.videos,
                                           max_new_tokens=a.max_new_tokens, min_new_tokens=a.min_new_tokens,
                                           draft_len=a.draft_len, model=a.model,
                                           threads=a.threads)
    _bench(acceptance, cfg, a.json)


def cmd_bench_draft_round(a):
    from .benchmarks import draft_round

    cfg = draft_round.DraftRoundBenchConfig(visual_tokens=a.visual_tokens, strategies=a.strategies,
                                            videos=a.videos, rounds=a.rounds, max_new_tokens=a.max_new_tokens,
                                            draft_len=a.draft_len, warm_check=not a.no_warm_check,
                                            threads=a.threads)
    _bench(draft_round, cfg, a.json)


def cmd_bench_serving(a):
    from .benchmarks import serving

    cfg = serving.ServingBenchConfig(visual_tokens=a.visual_tokens, videos=a.videos, rounds=a.rounds,
                                     max_new_tokens=a.max_new_tokens, strategies=a.strategies,
                                     draft_len=a.draft_len, threads=a.threads)
    _bench(serving, cfg, a.json)


def _named_paths(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in (x for x in text.split(",") if x):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"expected name=path[,name=path...], got {item!r}")
        pairs.append((name, path))
    return tuple(pairs)


def _defaults(config_cls) -> dict:
    """A config dataclass's field defaults: what a bench option defaults to, stated once, in the config."""
    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(config_cls)}


class _DefaultsHelp(argparse.HelpFormatter):
    """--help shows an option's default (lists comma-joined, as typed) unless its help already speaks of it."""

    def _get_help_string(self, action):
        d = action.default
        if not action.help or d is None or d is False or d == argparse.SUPPRESS or "default" in action.help:
            return action.help
        return f"{action.help} (default: {','.join(map(str, d)) if isinstance(d, tuple) else d})"


def _tree_spec(text: str) -> int | str:
    try:
        return spec_key(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tree_specs(text: str) -> tuple[int | str, ...]:
    return tuple(_tree_spec(x) for x in text.split(",") if x.strip())


_TREE_HELP = "K+b/b/... adds branches, each the ranks of the draft's candidates from the root: 7+1/01 adds " \
             "the first token's runner-up and the runner-up after the top-1 first token (greedy only)"


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def cmd_build(a):
    from .convert.build import main as build_main

    if bool(a.recipe) == bool(a.verify):
        sys.exit("error: give exactly one of --recipe RECIPE.yaml or --verify DIR")
    sys.exit(build_main(a.recipe, a.out, a.verify))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparrow", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build engine artifacts from a recipe (exit 0 complete, 3 prepared for a "
                                     "GPU host, 2 recipe error, 1 --verify found a problem)")
    p.add_argument("--recipe", help="engines/<name>.yaml")
    p.add_argument("--out", help="output directory (default: engines/build/<name> beside the recipe)")
    p.add_argument("--verify", metavar="DIR", help="re-hash an existing build against its manifest.json")
    p.set_defaults(fn=cmd_build)

    demo = sub.add_parser("demo", help="demo-world data").add_subparsers(dest="what", required=True)
    p = demo.add_parser("video", help="write a demo video (mp4) and its ground truth (json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--visual-tokens", type=int, default=None,
                   help="size the video for about this many visual tokens (default: 32 frames at --side)")
    p.add_argument("--side", type=int, default=64, help="frame side in pixels when --visual-tokens is not given")
    p.add_argument("--question-kind", default="colour_appear",
                   choices=["colour_appear", "colour_end", "direction", "count", "first"])
    p.add_argument("--out", required=True, help="output .mp4 path")
    p.set_defaults(fn=cmd_demo_video)

    train = sub.add_parser("train", help="train models").add_subparsers(dest="what", required=True)
    p = train.add_parser("target", help="train the demo target from scratch, then on long videos (resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", metavar="FILE.json",
                   help="recipe settings (TargetTrainConfig fields) overriding the defaults, e.g. "
                        '{"init": DIR} for a fine-tune, {"long_stage": null} to stop after the first stage')
    p.add_argument("--steps", type=int, help="the first stage's steps (default: the recipe's, TargetTrainConfig)")
    p.add_argument("--batch-size", type=int, help="default: the recipe's (TargetTrainConfig)")
    p.add_argument("--work-dir", default="runs/target_work", help="checkpoints; resumed if present")
    p.add_argument("--out", default="runs/demo_target", help="where the fp16 model is saved")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_train_target)

    p = train.add_parser("draft", help="train a Sparrow (or EAGLE baseline) draft on the target's states (resumable)")
    _add_model_arg(p)
    p.add_argument("--attend", default="window", choices=["window", "prefix"],
                   help="window: Sparrow text-anchor window (VATA); prefix: EAGLE baseline over every position")
    p.add_argument("--window", type=int, default=64, help="W: text anchors in the window")
    p.add_argument("--glimpses", type=int, default=16, help="IVSB glimpse vectors (0: no bridging)")
    p.add_argument("--glimpse-layer", type=int, default=2, help="target layer the glimpses are pooled from")
    p.add_argument("--mtp-steps", type=int, default=5, help="rollout length in training (1: no multi-token training)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--examples", type=int, default=3000, help="demo videos the target answers for training data")
    p.add_argument("--long-examples", type=int, default=60,
                   help="long demo videos (sizes: --long-videos) the target captions for phase 2 (0: no phase 2)")
    p.add_argument("--long-videos", type=_frames_by_side, default=None, metavar="FxS,...",
                   help="phase-2 video sizes, frames x side in pixels, taken in turn "
                        "(default: 200x256,128x256,128x128: 25,600, 16,384 and 4,096 visual tokens)")
    p.add_argument("--long-steps", type=int, default=300, help="phase-2 steps (mixed short and long videos)")
    p.add_argument("--init", default=None,
                   help="a trained draft of the same config: start phase 2 from it, skipping phase 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="runs/draft_data", help="cached target states (shards); reused if present")
    p.add_argument("--work-dir", default="runs/draft_work", help="checkpoints; resumed if present")
    p.add_argument("--out", default="runs/demo_draft", help="where the trained draft is saved")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_train_draft)

    ev = sub.add_parser("eval", help="evaluate models").add_subparsers(dest="what", required=True)
    p = ev.add_parser("target", help="answer accuracy on fresh demo videos, and with blank frames")
    _add_model_arg(p)
    p.add_argument("--videos", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="evaluation video set (never used in training)")
    p.add_argument("--binding", type=int, default=0, metavar="N",
                   help="also ask the colour of every shape of the first N videos (those of 2+ shapes) and count "
                        "the videos whose answer changes with the asked shape")
    p.add_argument("--captions", type=int, default=0, metavar="N",
                   help="also caption N long videos (--caption-visual-tokens) and compare them with the ground truth")
    p.add_argument("--caption-visual-tokens", type=int, default=25600, metavar="T")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_eval_target)

    p = sub.add_parser("serve", help="serve an engine directory (or the embedded demo pair) with Triton Inference "
                                     "Server (gRPC + HTTP)")
    p.add_argument("--engines", metavar="DIR", default=None,
                   help="a `sparrow build` output directory: its manifest gives the target, draft, vision encoder, "
                        "window, draft length, KV positions, max frames and instances (every artifact is re-hashed "
                        "first); default: the embedded demo pair from the package")
    p.add_argument("--backend", default="torch", choices=["torch", "tensorrt_llm"],
                   help="torch (CPU reference artifacts) or tensorrt_llm (GPU hosts with built engines)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--work-dir", default="runs/serve", help="where the runnable model repository and log go")
    p.add_argument("--max-frames", type=int, default=None,
                   help="refuse videos with more frames (default: the engine directory's, else 256)")
    p.add_argument("--max-video-mb", type=float, default=64.0, help="refuse larger video files")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV cache positions, prompt + video + answer (default: the build's max_seq_len, else 16384)")
    p.add_argument("--max-tokens-limit", type=int, default=256, help="largest max_tokens a request may ask")
    p.add_argument("--draft-len", type=int, default=None,
                   help="tokens the Sparrow draft proposes per step (default: the build's max_draft_len, else 5)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every model to load")
    p.add_argument("--grpc-tls-cert", default=None, help="PEM certificate: serve gRPC over TLS (with --grpc-tls-key)")
    p.add_argument("--grpc-tls-key", default=None, help="PEM private key of --grpc-tls-cert")
    p.add_argument("--grpc-tls-client-ca", default=None,
                   help="PEM CA certificate: mutual TLS, clients must present a certificate it signed")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("generate", help="answer a question about a video")
    p.add_argument("--video", required=True, help="mp4/webm file")
    p.add_argument("--prompt", default=None, help="question (default: the demo sidecar's question)")
    p.add_argument("--strategy", default="sparrow", choices=["sparrow", "eagle", "ar"],
                   help="sparrow: Sparrow draft + verify; eagle: full-context draft baseline; ar: target alone")
    p.add_argument("--draft", default=None, help="draft directory (default: the embedded demo draft of --strategy)")
    p.add_argument("--draft-len", type=_tree_spec, default=5,
                   help="K: drafted tokens per verify (tree depth); " + _TREE_HELP)
    p.add_argument("--tree-width", type=int, default=1,
                   help="1: a chain; w > 1: a static tree with the top-w draft tokens at every depth (greedy only)")
    p.add_argument("--runtime", default="sparrow", choices=["sparrow", "hf"],
                   help="sparrow: the owned-KV-cache runtime; hf: stock transformers cache")
    _add_model_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=None, help="sample this many frames (default: all)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="no end-of-turn before this many tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    p.set_defaults(fn=cmd_generate)

    from .benchmarks import acceptance, draft_round, runtime, serving, speedup  # torch-free at import

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)

    def bench_cmd(name: str, **kw) -> argparse.ArgumentParser:
        return bench.add_parser(name, formatter_class=_DefaultsHelp, **kw)

    d = _defaults(runtime.RuntimeBenchConfig)
    p = bench_cmd("runtime", help="owned-cache runtime vs stock transformers: decode and verify step cost")
    p.add_argument("--visual-tokens", type=_int_list, default=d["visual_tokens"], help="comma-separated sizes")
    p.add_argument("--draft-len", type=int, default=d["draft_len"], help="K: the verify step runs K+1 tokens")
    p.add_argument("--repeats", type=int, default=d["repeats"], help="timed passes (median reported)")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads")
    _add_model_arg(p)
    p.add_argument("--json", default=None, help="write the rows here (and a markdown table next to it)")
    p.set_defaults(fn=cmd_bench_runtime)

    d = _defaults(speedup.SpeedupBenchConfig)
    p = bench_cmd("speedup", help="ar vs eagle vs sparrow (and transformers generate) on the same videos")
    p.add_argument("--visual-tokens", type=_int_list, default=d["visual_tokens"], help="comma-separated sizes")
    p.add_argument("--strategies", type=_str_list, default=d["strategies"],
                   help="comma-separated: ar, eagle, sparrow, hf (transformers generate), hf_lookup (prompt lookup)")
    p.add_argument("--videos", type=int, default=d["videos"],
                   help="held-out demo videos per size (at 25.6k, 6 proved an easier-than-average sample)")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], help="tokens per answer")
    p.add_argument("--natural-stop", action="store_true",
                   help="stop at end-of-turn (default: every strategy decodes exactly --max-new-tokens, "
                        "transformers' min_new_tokens)")
    p.add_argument("--draft-len", type=_tree_specs, default=d["draft_len"],
                   help="K; comma-separated to time each speculative strategy once per K, side by side; " + _TREE_HELP)
    p.add_argument("--tree-width", type=int, default=d["tree_width"], help="1: chain; w > 1: top-w static tree")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads")
    _add_model_arg(p)
    p.add_argument("--sparrow-draft", default=None, help="default: the embedded demo draft")
    p.add_argument("--eagle-draft", default=None, help="default: the embedded EAGLE baseline draft")
    p.add_argument("--json", default=None, help="write rows here (and .md table, .png plot next to it)")
    p.set_defaults(fn=cmd_bench_speedup)

    d = _defaults(acceptance.AcceptanceBenchConfig)
    p = bench_cmd("acceptance", help="greedy lossless vs transformers generate, and mean accepted "
                                     "length per draft (the ablation table)")
    p.add_argument("--drafts", type=_named_paths, default=None,
                   help="name=dir[,name=dir...] (default: the embedded sparrow and eagle drafts)")
    p.add_argument("--visual-tokens", type=int, default=d["visual_tokens"], help="video size")
    p.add_argument("--videos", type=int, default=d["videos"], help="held-out demo videos")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], help="tokens per answer")
    p.add_argument("--min-new-tokens", type=int, default=d["min_new_tokens"],
                   help="hold end-of-turn back until this many tokens (bench speedup's fixed-length regime)")
    p.add_argument("--draft-len", type=_tree_specs, default=d["draft_len"],
                   help="K (chain); comma-separated: one row per draft and K, from the same prefills; " + _TREE_HELP)
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads")
    _add_model_arg(p)
    p.add_argument("--json", default=None, help="write rows here (and a .md table next to it)")
    p.set_defaults(fn=cmd_bench_acceptance)

    d = _defaults(draft_round.DraftRoundBenchConfig)
    p = bench_cmd("draft-round", help="draft ms per round at each video size, side by side in one process "
                                      "(the embedded drafts)")
    p.add_argument("--visual-tokens", type=_int_list, default=d["visual_tokens"], help="comma-separated sizes")
    p.add_argument("--strategies", type=_str_list, default=d["strategies"],
                   help="comma-separated: sparrow, eagle")
    p.add_argument("--videos", type=int, default=d["videos"], help="held-out demo videos per size")
    p.add_argument("--rounds", type=int, default=d["rounds"], help="passes over sizes and videos (median reported)")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], help="every decode runs this long")
    p.add_argument("--draft-len", type=int, default=d["draft_len"], help="K (chain)")
    p.add_argument("--no-warm-check", action="store_true",
                   help="skip the Sparrow rows whose draft weights are read right after each verify")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads")
    p.add_argument("--json", default=None, help="write rows here (and a .md table next to it)")
    p.set_defaults(fn=cmd_bench_draft_round)

    d = _defaults(serving.ServingBenchConfig)
    p = bench_cmd("serving", help="tokens/s through the Triton ensemble (streaming) vs in-process "
                                  "decoding on the same videos, interleaved")
    p.add_argument("--visual-tokens", type=int, default=d["visual_tokens"], help="video size")
    p.add_argument("--videos", type=int, default=d["videos"], help="held-out demo videos")
    p.add_argument("--rounds", type=int, default=d["rounds"], help="passes over the videos (each timed both ways)")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], help="tokens per answer")
    p.add_argument("--strategies", type=_str_list, default=d["strategies"], help="comma-separated: sparrow, ar")
    p.add_argument("--draft-len", type=int, default=d["draft_len"], help="K (chain)")
    p.add_argument("--threads", type=int, default=d["threads"],
                   help="torch threads, in-process and in the server alike")
    p.add_argument("--json", default=None, help="write rows here (and a .md table next to it)")
    p.set_defaults(fn=cmd_bench_serving)
    return ap


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
