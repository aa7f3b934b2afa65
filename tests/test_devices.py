"""clear.devices: the one device and dtype resolver, and the --dtype choices every CLI takes from it."""

import pytest
import torch
from scripts_loader import load_script

from clear import inference
from clear.devices import DTYPE_CHOICES, DTYPES, check_device, rank_device, resolve_device, resolve_dtype


@pytest.mark.parametrize("names,dtype", [(("bf16", "bfloat16"), torch.bfloat16),
                                         (("fp16", "float16", "half"), torch.float16),
                                         (("fp32", "float32", "float"), torch.float32)])
def test_dtype_names(names, dtype):
    for name in names:
        assert resolve_dtype(name, "cpu") is dtype and resolve_dtype(name, "cuda") is dtype
        assert inference.resolve_dtype(name, "cpu") is dtype  # the inference name delegates
    assert resolve_dtype(dtype, "cpu") is dtype


def test_auto_rules():
    for auto in (None, "auto"):
        assert resolve_dtype(auto, "cuda:1") is torch.bfloat16 and resolve_dtype(auto, "cpu") is torch.float32
        assert resolve_device(auto) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown dtype 'int8'; use one of auto, bfloat16, bf16"):
        resolve_dtype("int8", "cpu")
    assert set(DTYPE_CHOICES) == {"auto", *DTYPES}


def test_devices_checked():
    assert check_device("cpu") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
        assert rank_device(3, "bf16") == (torch.device("cpu"), torch.bfloat16)
        assert rank_device(0) == (torch.device("cpu"), torch.float32)


def test_clis_take_their_dtype_choices_from_devices():
    data = load_script("generate_data").parse_args(["--prompts", "p.txt", "--output_dir", "o", "--dtype", "bf16"])
    assert data.dtype == "bf16"
    evals = load_script("generate_eval_set").parse_args(["--prompts", "p.txt", "--out", "o", "--dtype", "fp16"])
    assert evals.dtype == "fp16"
    with pytest.raises(SystemExit):
        load_script("generate_eval_set").parse_args(["--prompts", "p.txt", "--out", "o", "--dtype", "int8"])
