"""export_model: validation before any write, atomic replacement, INT4 packing, providers."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from export_helpers import quantize, recipe
from torch import nn

import qat
import qat.io as export_io
from qat.export import FILENAMES, export_model, verify_artifacts
from qat.export.onnx import (
    default_providers,
    make_session,
    optimized_op_types,
    run_session,
    runtime_graph,
)
from qat.export.torchscript import load_torchscript
from qat.io import atomic_write_bytes
from qat.ops import Add
from qat.quant.layers.functional import FunctionalOp


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.add = Add(relu=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.add(self.block(h), h)
        return self.fc(self.flat(self.pool(h)))


def _batch() -> torch.Tensor:
    return torch.rand(8, 1, 6, 6)


@pytest.fixture(scope="module")
def qmodel() -> nn.Module:
    torch.manual_seed(0)
    return quantize(Net(), recipe(4), _batch)


def _snapshot(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_export_writes_both_targets(qmodel, tmp_path) -> None:
    paths = export_model(qmodel, tmp_path, _batch())
    assert set(paths) == {"torchscript", "onnx"}
    assert paths["onnx"] == tmp_path / FILENAMES["onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.ts"]
    onnx.checker.check_model(str(paths["onnx"]), full_check=True)
    # An ordinary file mode (mkstemp would leave 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert paths["onnx"].stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_previous_files_byte_identical(qmodel, tmp_path, monkeypatch) -> None:
    export_model(qmodel, tmp_path, _batch())
    before = _snapshot(tmp_path)

    def torn_write(f, data: bytes) -> None:
        f.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export_io, "_write_all", torn_write)
    with pytest.raises(OSError, match="disk full"):
        export_model(qmodel, tmp_path, torch.rand(3, 1, 6, 6))
    assert _snapshot(tmp_path) == before  # no temp file left, nothing replaced


@pytest.mark.parametrize("target", ["torchscript", "onnx"])
def test_failed_smoke_test_replaces_nothing(qmodel, tmp_path, monkeypatch, target) -> None:
    export_model(qmodel, tmp_path, _batch())
    before = _snapshot(tmp_path)
    import qat.export.artifacts as artifacts

    def broken(*args, **kwargs) -> None:
        raise RuntimeError(f"{target} smoke test failed (simulated)")

    monkeypatch.setattr(artifacts, f"_smoke_{target}", broken)
    with pytest.raises(RuntimeError, match="smoke test failed"):
        export_model(qmodel, tmp_path, torch.rand(3, 1, 6, 6))
    assert _snapshot(tmp_path) == before


def test_atomic_write_bytes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(f, data: bytes) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_io, "_write_all", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_unprepared_model_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="prepared"):
        export_model(Net(), tmp_path / "out", _batch())
    assert not (tmp_path / "out").exists()


def test_uninitialized_quantizer_is_named(tmp_path) -> None:
    q = qat.prepare(Net(), recipe(8))  # never calibrated
    with pytest.raises(ValueError, match=r"never saw data.*input_quant"):
        export_model(q, tmp_path / "out", _batch())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": ("tflite",)}, "unknown export target"),
        ({"targets": ()}, "unknown export target"),
        ({"opset": 11}, "opset"),
        ({"int4_packed": True, "opset": 17}, "int4_packed=True needs opset"),
    ],
)
def test_bad_arguments_fail_before_writing(qmodel, tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        export_model(qmodel, tmp_path / "out", _batch(), **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_example_input(qmodel, tmp_path) -> None:
    with pytest.raises(ValueError, match="example_input"):
        export_model(qmodel, tmp_path / "out", np.zeros((2, 1, 6, 6), dtype=np.float32))


class _Inline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h + h * 0.5)  # float math between quantized layers


def test_inline_add_is_refused_naming_the_layer_after_a_module_swap(tmp_path) -> None:
    q = quantize(_Inline(), recipe(8), _batch, steps=0, capture="modules")
    with pytest.raises(ValueError, match=r"layer b .*no quantization grid"):
        export_model(q, tmp_path / "out", _batch())
    assert not (tmp_path / "out").exists()


def test_inline_add_is_quantized_by_graph_capture(tmp_path) -> None:
    q = quantize(_Inline(), recipe(8), _batch, steps=0)
    assert q.qat_capture == {"mode": "graph"}
    assert isinstance(q.get_submodule("add"), qat.QAdd)
    assert isinstance(q.get_submodule("mul").act, FunctionalOp)  # h * 0.5: a float island
    paths = export_model(q, tmp_path / "out", _batch())
    report = verify_artifacts(q, paths, [torch.rand(32, 1, 6, 6)])
    # Feature maps, not logits: compared in output steps (both runtimes within one level).
    for runtime in report["runtimes"].values():
        assert runtime["max_diff_steps"] <= 1.0 + 1e-3
        assert runtime["mean_abs_diff"] <= 0.01 * report["output_scale"]


def test_model_is_not_modified(qmodel, tmp_path) -> None:
    state = {k: v.clone() for k, v in qmodel.state_dict().items()}
    training = [m.training for m in qmodel.modules()]
    export_model(qmodel, tmp_path, _batch())
    assert all(torch.equal(v, qmodel.state_dict()[k]) for k, v in state.items())
    assert training == [m.training for m in qmodel.modules()]


def test_int4_packed_is_smaller_and_runs_the_same_integer_kernels(qmodel, tmp_path) -> None:
    int8 = export_model(qmodel, tmp_path / "int8", _batch(), targets=["onnx"])["onnx"]
    int4 = export_model(qmodel, tmp_path / "int4", _batch(), targets=["onnx"], int4_packed=True)[
        "onnx"
    ]
    proto = onnx.load(str(int4))
    assert proto.opset_import[0].version == 21
    inits = {t.name: t for t in proto.graph.initializer}
    # Every conv / linear weight is stored packed and widened by a Cast in front of its DQ.
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert len(casts) == 3, [n.op_type for n in proto.graph.node]
    for cast in casts:
        assert inits[cast.input[0]].data_type == onnx.TensorProto.INT4
        assert cast.attribute[0].i == onnx.TensorProto.INT8
    assert int4.stat().st_size < int8.stat().st_size
    # ONNX Runtime folds the Cast and fuses the same integer kernels as for the int8 file: no
    # layer left in float.
    assert runtime_graph(int4) == runtime_graph(int8)
    assert runtime_graph(int4)["float_ops"] == []
    x = torch.rand(16, 1, 6, 6)
    a = run_session(make_session(int8, threads=1), x)[0]
    b = run_session(make_session(int4, threads=1), x)[0]
    np.testing.assert_array_equal(a, b)


def test_int8_holding_4bit_weights_still_fuses(qmodel, tmp_path) -> None:
    path = export_model(qmodel, tmp_path, _batch(), targets=["onnx"])["onnx"]
    ops = optimized_op_types(path)
    # The residual add runs on QLinearAdd, no float op left (the input's Mul(1/s) → Q is its
    # quantization).
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1, ops
    assert not {"Conv", "Add"} & set(ops), ops
    assert runtime_graph(path)["float_ops"] == []


def test_dynamic_batch(qmodel, tmp_path) -> None:
    paths = export_model(qmodel, tmp_path, torch.rand(1, 1, 6, 6))
    x = torch.rand(5, 1, 6, 6)
    with torch.no_grad():
        ref = qmodel(x)
        ts = load_torchscript(paths["torchscript"])(x)
    ort_out = run_session(make_session(paths["onnx"], threads=1), x)[0]
    assert ts.shape == ref.shape and ort_out.shape == tuple(ref.shape)


def test_default_providers_prefer_gpu() -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider"]
    assert default_providers(available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    all_three = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(list(reversed(all_three))) == all_three


@pytest.mark.gpu
def test_onnx_runs_on_gpu_providers(qmodel, tmp_path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here")
    path = export_model(qmodel, tmp_path, _batch(), targets=["onnx"])["onnx"]
    session = make_session(path)
    assert session.get_providers()[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    x = torch.rand(16, 1, 6, 6)
    with torch.no_grad():
        ref = qmodel(x)
    out = torch.from_numpy(run_session(session, x)[0])
    scale = float(qmodel.fc.output_quant.qparams()[0])
    assert float((out - ref).abs().max()) / scale <= 1.0 + 1e-4
    # The same file on the CPU provider: the GPU kernels compute the same integer model (each
    # output within one output step of the CPU's, not just within one of the reference).
    cpu = make_session(path, providers=["CPUExecutionProvider"])
    assert cpu.get_providers() == ["CPUExecutionProvider"]
    on_cpu = torch.from_numpy(run_session(cpu, x)[0])
    assert float((out - on_cpu).abs().max()) / scale <= 1.0 + 1e-4
