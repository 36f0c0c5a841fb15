import os
from pathlib import Path

import pytest

# Keep tests from oversubscribing a 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "engines" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """`sparrow build` of the demo recipe, once per session (about 25 s): (output directory, exit code).
    Shared by the converter and serving tests; a test that tampers with it works on a copy."""
    pytest.importorskip("onnxruntime_extensions")
    from sparrow.convert import build

    out = tmp_path_factory.mktemp("demo_build")
    return out, build.main(str(DEMO_RECIPE), str(out), None)
