"""Language-model export: GGUF and ONNX files agree with the fake-quant model they came from.

A tiny GPT trained briefly on stdlib text, quantized with the real presets (configs/quant/lm_*),
exported; the files are checked bit for bit (GGUF tensors) and by next-token agreement and
perplexity on test text (targets: ≥ 99.9% top-1 agreement, perplexity within 0.5%).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qat.export.lm_weights import weighted_layers
from qat.export.stage_lm import export_lm, run_lm_export
from qat.export.verify_lm import check_lm_parity, verify_lm_artifacts

gguf = pytest.importorskip("gguf")
pytest.importorskip("onnxruntime")

from lm_helpers import float_gpt, lm_test_batches, qat_gpt, w8da8_per_tensor  # noqa: E402

PARITY = {"min_agreement": 0.999, "max_ppl_rel_diff": 0.005}


def _gguf_tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(n) for n in reversed(t.shape.tolist())]
        out[t.name] = (
            t.tensor_type.name,
            torch.from_numpy(np.array(data, np.float32)).reshape(shape),
        )
    return out


@pytest.fixture(scope="module")
def q4_model() -> torch.nn.Module:
    return qat_gpt("lm_q4_0")


def test_gguf_q4_0_file_holds_the_fake_quant_weights_bit_for_bit(
    q4_model: torch.nn.Module, tmp_path: Path
) -> None:
    paths = export_lm(q4_model, tmp_path, lm_test_batches(1)[0][0][:1], targets=["gguf"])
    tensors = _gguf_tensors(paths["gguf"])
    names = {
        "tok_emb": "token_embd.weight",
        "pos_emb": "position_embd.weight",
        "blocks.0.attn.qkv": "blk.0.attn_qkv.weight",
        "blocks.1.mlp.proj": "blk.1.ffn_down.weight",
        "head": "output.weight",
    }
    layers = dict(weighted_layers(q4_model))
    for layer_name, tensor_name in names.items():
        layer = layers[layer_name]
        kind, value = tensors[tensor_name]
        assert kind == ("Q4_0" if layer.weight_quant.spec.grid == "q4_0" else "Q8_0")
        with torch.no_grad():
            trained = layer.weight_quant(layer.weight)
        assert torch.equal(value, trained), tensor_name
    assert tensors["blk.0.attn_qkv.weight"][0] == "Q4_0"
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"


@pytest.mark.parametrize("preset", ["lm_q4_0", "lm_q8_0"])
def test_gguf_and_onnx_agree_with_the_fake_quant_model(preset: str, tmp_path: Path) -> None:
    model = q4_model_for(preset)
    options = {"targets": ["gguf", "onnx"], "parity": PARITY, "bench": False}
    report = run_lm_export(model, lm_test_batches(4), options, tmp_path)
    assert report["parity_ok"], report.get("parity_error")
    runtimes = report["parity"]["runtimes"]
    assert report["parity"]["num_tokens"] == 4 * 16 * 64
    # The GGUF runner computes llama.cpp's arithmetic, which is the fake-quant model's.
    assert runtimes["gguf"]["agreement"] == 1.0
    assert runtimes["gguf"]["ppl_rel_diff"] < 1e-6
    assert set(report["layers"].values()) == {"nbits", "gather"}


def q4_model_for(preset: str) -> torch.nn.Module:
    return qat_gpt(preset, steps=10)


@pytest.mark.parametrize(
    "preset,kernel",
    [
        ("lm_w8da8", "MatMulInteger"),  # per-token int8 codes, u8 x s8 GEMM
        ("w8da8_per_tensor", "DynamicQuantizeMatMul"),
        ("lm_8da4w", "MatMulNBits"),
        ("lm_w4g32", "MatMulNBits"),
    ],
)
def test_onnx_dynamic_int8_and_4bit_agree_with_the_fake_quant_model(
    preset: str, kernel: str, tmp_path: Path
) -> None:
    from qat.export.onnx.runtime import optimized_op_types

    model = qat_gpt(w8da8_per_tensor() if preset == "w8da8_per_tensor" else preset, steps=10)
    paths = export_lm(model, tmp_path, lm_test_batches(1)[0][0][:1], targets=["onnx"])
    report = verify_lm_artifacts(model, paths, lm_test_batches(4))
    check_lm_parity(report, **PARITY)
    ops = optimized_op_types(paths["onnx"])
    linears = 2 * 4 + 1  # qkv, proj, fc, proj per block, and the output layer
    assert ops[kernel] == linears, ops


def test_gguf_refuses_weights_it_cannot_store(tmp_path: Path) -> None:
    model = qat_gpt("lm_w4g32", steps=0)
    with pytest.raises(ValueError, match=r"token_embd\.weight: .* affine grid.*grid q4_0 or q8_0"):
        export_lm(model, tmp_path, lm_test_batches(1)[0][0][:1], targets=["gguf"])
    assert not list(tmp_path.iterdir())  # nothing written


def test_dynamic_tensor_activations_equal_onnx_dynamic_quantize_linear() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qat.quant.dynamic import dynamic_quantize
    from qat.quant.spec import QuantSpec

    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    spec = QuantSpec(bits=8, signed=False, symmetric=False, dynamic="tensor")
    for seed in range(5):
        x = torch.randn(4, 33, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        if seed == 4:
            x = x.abs() + 0.5  # all positive: the zero point saturates at 0
        (y,) = session.run(None, {"x": x.numpy()})
        assert torch.equal(dynamic_quantize(x, spec), torch.from_numpy(y)), seed
    del onnx


def test_rtn_q4_0_file_bytes_equal_gguf_quantize(tmp_path: Path) -> None:
    """Observed Q4_0 scales are what gguf.quants.quantize computes: the bytes are the same."""
    from qat.export.gguf import pack_blocks
    from qat.export.lm_weights import quant_weight

    model = qat_gpt("lm_q4_0", steps=0)
    layer = model.blocks[0].mlp.fc
    qw = quant_weight(layer)
    ours = pack_blocks(qw.codes, qw.scales, "q4_0")
    ref = gguf.quants.quantize(layer.weight.detach().numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(ours, ref)
    assert float_gpt() is not None
