"""Run scripts in-process: load scripts/NAME.py as a module (under a name no installed
package can shadow), read the message a command line exits with, and reset accelerate's
process-wide state between runs."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"clear_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_error(script, argv, monkeypatch) -> str:
    """``script.cli()`` with ``argv`` in-process: returns the message it exits with (status 1)."""
    monkeypatch.setattr(sys, "argv", [Path(script.__file__).name, *argv])
    with pytest.raises(SystemExit) as exit_info:
        script.cli()
    code = exit_info.value.code
    assert isinstance(code, str) and code.startswith("error: "), code  # sys.exit(str): exit status 1
    return code


def reset_accelerate_state():
    """Each in-process ``main()`` that builds an ``Accelerator`` needs accelerate's singletons cleared after it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
