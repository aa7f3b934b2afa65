"""The inference notebooks run headless (papermill) against the tiny pipeline, with the
kernel on this very interpreter (a kernelspec written to a temporary JUPYTER_PATH, so a
clean clone with only requirements.txt installed works)."""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "clear-tests-python"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "clear tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter" / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return KERNEL


def _run(name, kernel, tmp_path, **parameters):
    import papermill

    out = tmp_path / name
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, kernel_name=kernel,
                               cwd=str(tmp_path), progress_bar=False, execution_timeout=600)
    return nbformat.read(str(out), as_version=4)


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


@pytest.mark.parametrize("name", ["inference_t2i.ipynb", "inference_t2i_highres.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(str(NOTEBOOKS / name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])


@pytest.mark.slow
def test_inference_t2i_notebook(kernel, tmp_path, tiny_flux_pipeline_dir):
    out_dir = tmp_path / "out"
    nb = _run("inference_t2i.ipynb", kernel, tmp_path, model=tiny_flux_pipeline_dir, height=32, width=48, steps=2,
              max_sequence_length=16, radius=2, down_factor=2, checkpoint="none", device="cpu", dtype="float32",
              warmup=False, out_dir=str(out_dir))
    text = _stdout(nb)
    assert "original:" in text and "CLEAR r=2 df=2:" in text and "% of full attention's FLOPs" in text
    assert _images(nb) == 2  # the side-by-side grid and the mask picture
    grid = Image.open(out_dir / "t2i_compare.png")
    assert grid.width >= 2 * 48
    mask = Image.open(out_dir / "t2i_mask.png")
    assert int(mask.text["clear:seen"]) > 0


@pytest.mark.slow
def test_inference_t2i_highres_notebook(kernel, tmp_path, tiny_flux_pipeline_dir):
    out_dir = tmp_path / "out"
    nb = _run("inference_t2i_highres.ipynb", kernel, tmp_path, model=tiny_flux_pipeline_dir, base_height=32,
              base_width=48, sizes="48x64,64x96", steps=2, upscale_steps=3, max_sequence_length=16, radius=2,
              checkpoint="none", device="cpu", dtype="float32", out_dir=str(out_dir))
    text = _stdout(nb)
    assert "stage 2: upscale 64x96" in text and "3 stages" in text
    assert _images(nb) == 3  # one grid per stage
    sizes = [Image.open(out_dir / f).size for f in ("highres_stage0_32x48.png", "highres_stage1_48x64.png",
                                                     "highres_stage2_64x96.png")]
    assert sizes == [(48, 32), (64, 48), (96, 64)]
