"""CLEAR on transformers whose linear layers are quantized (torchao weight-only int8, on CPU): the CLEAR model equals
the quantized stock model with diffusers' processors on the dense mask (tests/reference_attention.py), whether CLEAR
is applied after quantizing or its weights are loaded into the float model that is quantized afterwards; what cannot
work (saving, loading or training quantized projections) is refused with the way that works."""

import copy

import pytest
import torch
from torchao.quantization import Int8WeightOnlyConfig, quantize_

import clear
from clear import backends
from reference_attention import Pattern, ReferenceFlux2Processor, ReferenceQwenProcessor, reference_model
from tiny_models import flux2_inputs, qwenimage_inputs, tiny_flux2, tiny_qwenimage

# family -> (tiny model, inputs, reference processor, reference tokens, the inputs' text mask)
CASES = {
    "flux2": (tiny_flux2, lambda: flux2_inputs(8, 8, 7, references=((4, 4),)), ReferenceFlux2Processor, 16, None),
    "qwenimage": (tiny_qwenimage, lambda: qwenimage_inputs(8, 8, 7, valid=[7, 3]), ReferenceQwenProcessor, 0,
                  torch.tensor([[1] * 7, [1] * 3 + [0] * 4]).bool()),
}


def quantized(model):
    quantize_(model, Int8WeightOnlyConfig())
    return model


def run(model, x):
    with torch.no_grad():
        return model(**x)[0]


@pytest.mark.parametrize("backend", backends.names())
@pytest.mark.parametrize("family", list(CASES))
def test_clear_on_a_quantized_model_equals_its_masked_reference(family, backend):
    make, inputs, processor, refs, valid = CASES[family]
    stock = quantized(make())
    assert type(stock.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    model = copy.deepcopy(stock)
    clear.apply_clear(model, radius=2.5, down_factor=2, backend=backend)
    x = inputs()
    ref = reference_model(stock, processor, Pattern(7, 8, 8, refs, 2.5, 2, valid=valid), model)
    got = run(model, x)
    torch.testing.assert_close(got, run(ref, x), atol=1e-5, rtol=1e-5)
    assert (got - run(make(), x)).abs().max() > 0  # int8 weights: not the float model


@pytest.mark.parametrize("family", list(CASES))
def test_clear_weights_go_into_the_float_model_before_quantizing(family, tmp_path):
    make, inputs, processor, refs, valid = CASES[family]
    trained = make()
    clear.apply_clear(trained, radius=2.5, down_factor=2, backend="dense")
    with torch.no_grad():
        for p in clear.clear_state_dict_keys(trained).values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = clear.save_clear_weights(trained, tmp_path / "clear_local_2.5_down_2.safetensors")

    model = make()
    clear.apply_clear(model, radius=2.5, down_factor=2, backend="dense")
    clear.load_clear_weights(model, path)
    stock = copy.deepcopy(model)
    clear.remove_clear(stock)  # the float model with the CLEAR checkpoint's projections
    quantized(model), quantized(stock)
    x = inputs()
    ref = reference_model(stock, processor, Pattern(7, 8, 8, refs, 2.5, 2, valid=valid), model)
    torch.testing.assert_close(run(model, x), run(ref, x), atol=1e-5, rtol=1e-5)

    with pytest.raises(TypeError, match="attention projections of this model are quantized .*Int8Tensor.*load them "
                                        "into the float model"):
        clear.save_clear_weights(model, tmp_path / "again.safetensors")
    with pytest.raises(TypeError, match="are quantized"):
        clear.load_clear_weights(model, path)
    from clear.distill import freeze_for_distillation

    with pytest.raises(TypeError, match="distillation trains, float projections"):
        freeze_for_distillation(model)
