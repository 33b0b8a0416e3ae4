"""Whole models from the registry, on digits: export, verify, inspect the graphs, fresh processes.

Each model is prepared, calibrated, trained a few QAT steps with observers on (weights, BN
statistics and ranges all move), then exported with :func:`qat.export.export_model`.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import quantize, recipe, train_float
from torch import nn

from qat import snap_bias
from qat.data import DigitsDataModule
from qat.export import check_parity, export_model, verify_artifacts
from qat.export.convert import convert
from qat.export.onnx import (
    INTEGER_OP_TYPES,
    make_session,
    optimized_op_types,
    run_session,
    runtime_graph,
)
from qat.export.torchscript import integer_ops, load_torchscript
from qat.models import create_model

MODELS = {
    # name: (image size, extra model kwargs, float pre-training steps, Adam lr)
    "resnet20": (8, {}, 60, 3e-3),
    "lenet5": (8, {}, 60, 3e-3),
    "mobilenetv2": (8, {"width_mult": 0.25}, 60, 1e-2),
}


@pytest.fixture(scope="module")
def digits() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    dm = DigitsDataModule(batch_size=64, image_size=8)
    dm.setup("fit")
    dm.setup("test")
    train = list(dm.train_dataloader())
    x, y = next(iter(dm.test_dataloader()))
    return train, (x, y)


_FLOAT: dict[str, nn.Module] = {}
_CACHE: dict[tuple[str, int], tuple[nn.Module, dict[str, Path], Path]] = {}


def _exported(
    name: str, bits: int, digits, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, dict[str, Path], Path]:
    """Float pre-training (once per model) → prepare, calibrate, a few QAT steps with
    observers on → snap the bias to the int32 grid → export. Cached per (model, bits)."""
    key = (name, bits)
    if key not in _CACHE:
        size, kw, float_steps, lr = MODELS[name]
        train, _ = digits
        if name not in _FLOAT:
            torch.manual_seed(0)
            model = create_model(name, num_classes=10, in_channels=1, image_size=size, **kw)
            _FLOAT[name] = train_float(model, train, float_steps, lr)
        it = iter(train * 2)
        labels: dict[int, torch.Tensor] = {}

        def batch() -> torch.Tensor:
            x, y = next(it)
            labels[id(x)] = y
            return x

        # Last layer at 8 bits in the W4 recipe, as the W4 experiments do.
        rec = recipe(
            bits, overrides=[] if bits == 8 else [{"pattern": "fc", "weight": {"bits": 8}}]
        )
        # MobileNetV2 with live BN statistics diverges under activation quantization on these
        # tiny images (a core issue, see the export report), so it trains with BN frozen.
        q = quantize(
            _FLOAT[name],
            rec,
            batch,
            steps=5,
            lr=1e-3,
            targets=lambda x: labels[id(x)],
            freeze_bn=name == "mobilenetv2",
        )
        example = train[0][0][:8]
        assert snap_bias(q, example)
        out = tmp_path_factory.mktemp(f"{name}_w{bits}")
        paths = export_model(q, out, example_input=example)
        _CACHE[key] = (q, paths, out)
    return _CACHE[key]


# Max |logit difference| in output steps. Shallow or 4-bit models: one step (the integer and the
# fake-quant arithmetic differ only at float ties, after snap_bias). Deep 8-bit models amplify
# those rare tie flips layer after layer: MobileNetV2 W8A8 showed 0 flips in its first 4 layers,
# 2 in 10^6 outputs in the 5th and a few % by the head; the logits then move by several steps
# (2-13 over repeated runs: oneDNN's float convs in the fake-quant model are not bitwise
# reproducible across processes), while top-1 stays identical. For those, the mean error and
# the agreement are asserted, and the max is only bounded.
DEEP_8BIT = {("resnet20", 8), ("mobilenetv2", 8)}


@pytest.mark.parametrize("bits", [8, 4], ids=["w8a8", "w4a4"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_parity(name: str, bits: int, digits, tmp_path_factory) -> None:
    q, paths, _ = _exported(name, bits, digits, tmp_path_factory)
    _, test = digits
    report = verify_artifacts(q, paths, [test])
    check_parity(report, min_agreement=1.0, max_accuracy_drop_pt=0.0)
    scale = report["output_scale"]
    for rt in ("torchscript", "onnx"):
        r = report["runtimes"][rt]
        assert r["agreement"] == 1.0, (rt, r)
        assert r["accuracy"] == report["fake_quant"]["accuracy"]
        if (name, bits) in DEEP_8BIT:
            assert r["mean_abs_diff"] / scale <= 0.25, (rt, r)
            assert r["max_diff_steps"] <= 32, (rt, r)
        else:
            assert r["max_diff_steps"] <= 1.0 + 1e-4, (rt, r)


def test_unsnapped_bias_is_reported_not_hidden(digits, tmp_path_factory) -> None:
    """Without snap_bias, ONNX's int32 bias rounding shows up in the report (W4A4)."""
    q, paths, _ = _exported("resnet20", 4, digits, tmp_path_factory)
    q = copy.deepcopy(q)
    _, test = digits
    with torch.no_grad():  # move every bias off the int32 grid by a third of a level
        for d in convert(q, test[0][:8]).layers.values():
            if d.integer and d.bias_scale is not None:
                mod = d.module
                target = mod.bn.bias if hasattr(mod, "bn") else mod.bias
                target.add_(d.bias_scale / 3)
    report = verify_artifacts(q, paths, [test])
    assert report["runtimes"]["onnx"]["max_diff_steps"] >= 1.0


@pytest.mark.parametrize("bits", [8, 4], ids=["w8a8", "w4a4"])
def test_graphs_run_integer_kernels(bits: int, digits, tmp_path_factory) -> None:
    """TorchScript calls quantized::*; ORT's optimized graph is integer kernels, no float conv."""
    _, paths, _ = _exported("resnet20", bits, digits, tmp_path_factory)
    ts_ops = integer_ops(load_torchscript(paths["torchscript"]))
    for op in (
        "quantized::conv2d",
        "quantized::conv2d_relu",
        "quantized::add_relu",
        "quantized::linear",
        "aten::_make_per_tensor_quantized_tensor",  # the input, rounded as the model rounds
    ):
        assert op in ts_ops, ts_ops

    ops = optimized_op_types(paths["onnx"])
    assert ops["QLinearConv"] == 21  # 19 convs + 2 shortcut convs: every conv is integer
    # Residual adds on QLinearAdd (the fake-quant model computes its rounding).
    assert ops["QLinearAdd"] == 9
    assert ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    assert not {"Conv", "Gemm", "MatMul", "Add"} & set(ops), ops
    # The model input is quantized (Mul(1/s) → Q, as the fake-quant model rounds), the logits
    # dequantized: no DQ → Q left inside.
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1 and ops["Mul"] == 1, ops
    assert runtime_graph(paths["onnx"])["float_ops"] == []
    allowed = {"QuantizeLinear", "DequantizeLinear", "Clip", "Flatten", "MaxPool", "Mul"}
    assert set(ops) <= set(INTEGER_OP_TYPES) | allowed
    # Sub-8-bit grids are clamped in the integer domain (Clip on uint8), never in float.
    assert ("Clip" in ops) == (bits < 8)


def test_lenet_graph_keeps_maxpool_on_uint8(digits, tmp_path_factory) -> None:
    _, paths, _ = _exported("lenet5", 8, digits, tmp_path_factory)
    ops = optimized_op_types(paths["onnx"])
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 3 and ops["MaxPool"] == 2, ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops


def _run(code: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("bits", [8, 4], ids=["w8a8", "w4a4"])
def test_fresh_process_loads_artifacts_without_qat(bits: int, digits, tmp_path_factory) -> None:
    """A process that imports neither qat (nor, for ONNX, torch) reproduces the outputs."""
    q, paths, out = _exported("resnet20", bits, digits, tmp_path_factory)
    _, (x, _) = digits
    with torch.no_grad():
        ref = q(x)
        ts_here = load_torchscript(paths["torchscript"])(x)
    onnx_here = run_session(make_session(paths["onnx"], threads=1), x)[0]
    np.save(out / "x.npy", x.numpy())
    np.save(out / "ts.npy", ts_here.numpy())
    np.save(out / "onnx.npy", onnx_here)
    np.save(out / "ref_top1.npy", ref.argmax(1).numpy())

    ts = _run(
        f"""
        import sys, numpy as np, torch
        # As the README tells users: the engine the export verified under, set before loading.
        torch.backends.quantized.engine = "x86"
        m = torch.jit.load({str(paths["torchscript"])!r})
        with torch.no_grad():
            y = m(torch.from_numpy(np.load("x.npy"))).numpy()
        assert "qat" not in sys.modules, "TorchScript loading imported qat"
        assert (y.argmax(1) == np.load("ref_top1.npy")).all()
        print(float(np.abs(y - np.load("ts.npy")).max()))
        """,
        out,
    )
    assert float(ts.strip().splitlines()[-1]) == 0.0

    onnx_out = _run(
        f"""
        import sys, numpy as np, onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        s = ort.InferenceSession({str(paths["onnx"])!r}, so, providers=["CPUExecutionProvider"])
        y = s.run(None, {{"input": np.load("x.npy")}})[0]
        assert "torch" not in sys.modules, "ONNX Runtime inference imported torch"
        assert "qat" not in sys.modules
        assert (y.argmax(1) == np.load("ref_top1.npy")).all()
        print(float(np.abs(y - np.load("onnx.npy")).max()))
        """,
        out,
    )
    assert float(onnx_out.strip().splitlines()[-1]) == 0.0
