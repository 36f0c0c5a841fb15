"""Build a TensorRT engine from an ONNX file with one optimisation profile, the sparrow attention
plugin registered (TensorRT 10+ Python API). Run by the generated `build_engines.sh` on a GPU host:

    python -m sparrow.convert.trt_engine ONNX PLAN --shapes name:min,opt,max[;name:...] [--fp16]

where min/opt/max are `x`-joined dims, e.g. `pixel_values:4x1536,1024x1536,16384x1536`.
Written to TensorRT's public API; not run here (TensorRT cannot be installed on this project's machines).
"""

from __future__ import annotations

import argparse
import sys


def _shapes(spec: str) -> dict[str, list[tuple[int, ...]]]:
    out = {}
    for item in filter(None, spec.split(";")):
        name, dims = item.split(":")
        out[name] = [tuple(int(d) for d in s.split("x")) for s in dims.split(",")]
    return out


def build(onnx_path: str, plan: str, shapes: dict, fp16: bool) -> None:
    try:
        import tensorrt as trt
    except ImportError:
        sys.exit("error: TensorRT's Python package is not installed (pip install tensorrt on a GPU host)")
    from ..plugins import tensorrt_plugin

    tensorrt_plugin.register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        sys.exit("error: TensorRT could not parse " + onnx_path + ": " +
                 "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        sys.exit(f"error: TensorRT failed to build {plan}")
    with open(plan, "wb") as f:
        f.write(engine)
    print(f"wrote {plan}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sparrow.convert.trt_engine", description=__doc__.split("\n")[0])
    p.add_argument("onnx")
    p.add_argument("plan")
    p.add_argument("--shapes", default="", help="name:min,opt,max[;name:...] for the dynamic inputs")
    p.add_argument("--fp16", action="store_true")
    a = p.parse_args(argv)
    build(a.onnx, a.plan, _shapes(a.shapes), a.fp16)


if __name__ == "__main__":
    main()
