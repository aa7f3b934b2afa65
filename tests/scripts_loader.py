"""Run scripts in-process: load scripts/NAME.py as a module (under a name no installed
package can shadow), and reset accelerate's process-wide state between runs."""

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"clear_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate_state():
    """Each in-process ``main()`` that builds an ``Accelerator`` needs accelerate's singletons cleared after it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
