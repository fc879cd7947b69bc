import contextlib
import os
import sys

import torch

# Without a GPU the kernels run on CPU tensors through the Triton interpreter, which triton.jit
# picks at decoration time: set it before anything imports triton.
if not torch.cuda.is_available():
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
        "triton was imported before TRITON_INTERPRET=1 could be set"
    )
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import foak_compile  # noqa: E402


def pytest_report_header(config):
    # a failure on other releases than constraints.txt names them (bash scripts/test.sh --latest)
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "gptqmodel"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} -")
    return "foak-compile against: " + ", ".join(found)


@pytest.fixture(autouse=True)
def _fresh_compile_state():
    torch._dynamo.reset()
    foak_compile.reset_reports()
    yield
    torch._dynamo.reset()


@pytest.fixture
def foak_config():
    """Set foak_compile knobs for the rest of a test: foak_config(lce_online=False) enters
    foak_compile.config.patch(lce_online=False), left at teardown (use it instead of monkeypatching)."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(foak_compile.config.patch(**changes))


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
