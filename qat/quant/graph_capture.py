"""Capture a model's forward as a ``torch.fx`` graph, as its author wrote it.

Why ``torch.fx`` (symbolic tracing) rather than ``torch.export``: fx keeps the model's own
modules as ``call_module`` nodes under their qualified names, so the prepared model keeps its
parameter names (checkpoints and per-layer overrides by name still work), its conv / BN /
activation modules stay leaves we can fuse and swap, and inline ops (``out += identity``,
``F.relu``, ``torch.cat``, ``x @ w``) appear as nodes we can quantize. ``torch.export`` lowers to
ATen ops with lifted parameters: the module structure, and with it the names, are gone, and
capture is slower. What fx cannot trace (data-dependent Python control flow) falls back to the
module swap, with the line that stopped the capture named (:class:`CaptureError`).

The graph is traced in eval mode: Python branches on ``self.training`` inside a traced forward
take their evaluation side (what the exported model runs). Modules whose own forward branches
on ``self.training`` and that hold no parameters (drop-path / stochastic depth) are kept as
leaves, so they still follow ``.train()`` / ``.eval()``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from qat.ops import Add, Cat
from qat.quant.layers import QUANT_MODULES
from qat.quant.norm_act import split_norm_act
from qat.quant.quantizer import FakeQuantizer

__all__ = ["CaptureError", "adopt_graph", "capture", "is_captured", "split_example"]

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_QAT_DIR = str(Path(__file__).resolve().parents[1])


class CaptureError(RuntimeError):
    """The model's forward could not be captured as a graph; ``where`` names the line."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


@functools.cache
def _reads_training_flag(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "self.training" in source


_UNKNOWN = object()
#: Reading these of a tensor gives its metadata, never its data: branches on them are on shapes.
_META_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"})
_META_METHODS = frozenset({"size", "dim", "ndimension", "numel", "__len__", "is_floating_point"})


class _Tracer(fx.Tracer):
    """fx's tracer, with every node's value on the example input alongside (when given).

    Python control flow on a traced value (``if x.shape[1] == n``, ``for t in x.shape``)
    stops a symbolic trace. With example values, where the value depends on shapes and
    constants only (never on tensor data), the tracer takes the branch the example takes and
    records where (``specialized``): the graph is then specialized to inputs shaped like the
    example, as a model exported at a fixed input size is; :func:`capture` checks the graph
    computes what the model computes on the example.
    """

    def __init__(
        self, leaf_types: tuple[type[nn.Module], ...], example: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        # Buffers as get_attr nodes of the module's own buffer, not constants copied at trace
        # time: a buffer the forward reassigns or updates stays live, and a method called on
        # it with traced arguments (``self.rel_indices.expand(B, ...)``) traces.
        self.proxy_buffer_attributes = True
        self.leaf_types = leaf_types
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.static: set[fx.Node] = set()  # Python values computed from shapes, never data
        self.specialized: list[str] = []
        self._eager = False  # computing a value: module calls and attributes stay concrete
        self._tensor_names: dict[int, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (Add, Cat, FakeQuantizer, *QUANT_MODULES, *self.leaf_types)):
            return True
        if (
            not type(m).__module__.startswith("torch.")
            and next(m.parameters(), None) is None
            and _reads_training_flag(type(m))
        ):
            return True  # mode-dependent and weightless: run it, don't bake one branch
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if self._eager:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._eager or not isinstance(attr_val, torch.Tensor):
            return attr_val
        # fx finds a parameter's name by scanning all of them at every read (a third of the
        # capture time of a 400-module model); the names by identity, built once.
        if self._tensor_names is None:
            self._tensor_names = {id(b): n for n, b in self.root.named_buffers()}
            self._tensor_names.update({id(p): n for n, p in self.root.named_parameters()})
        name = self._tensor_names.get(id(attr_val))
        if name is None or self.param_shapes_constant:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_proxy(
        self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None
    ):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example is not None:
            node = proxy.node
            self.values[node] = value = self._evaluate(node)
            if self._is_static(node, value):
                self.static.add(node)
        return proxy

    def _is_static(self, node: fx.Node, value: Any) -> bool:
        """True for a Python value that depends on shapes and constants only (not on data:
        ``x.shape[1] == n`` is, ``h.mean() > 0`` and ``h.sum().item()`` are not)."""
        if value is _UNKNOWN or isinstance(value, torch.Tensor):
            return False
        if node.op in ("placeholder", "get_attr"):
            return True
        if node.op == "call_function" and node.target is getattr:
            # ``x.shape``, and an attribute of such metadata (``x.device.type``).
            return len(node.args) > 1 and (
                node.args[1] in _META_ATTRS or node.args[0] in self.static
            )
        if node.op == "call_method" and node.target in _META_METHODS:
            return True
        return all(n in self.static for n in node.all_input_nodes)

    def _evaluate(self, node: fx.Node) -> Any:
        """``node``'s value on the example (its inputs' values known), or ``_UNKNOWN``."""

        def value(arg: Any) -> Any:
            if isinstance(arg, fx.Node):
                v = self.values.get(arg, _UNKNOWN)
                if v is _UNKNOWN:
                    raise LookupError
                return v
            return arg

        self._eager = True
        try:
            args = fx.node.map_aggregate(node.args, value)
            kwargs = fx.node.map_aggregate(node.kwargs, value)
            if node.op == "placeholder":
                return self.example.get(str(node.target).lstrip("*"), _UNKNOWN)
            if node.op == "get_attr":
                obj: Any = self.root
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                return obj
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception:
            pass
        finally:
            self._eager = False
        return _UNKNOWN

    def _known(self, obj: fx.Proxy, what: str) -> Any:
        if obj.node not in self.static:
            return _UNKNOWN  # data-dependent: no graph can bake it (the module swap can)
        v = self.values[obj.node]
        frame = next(
            (f for f in reversed(traceback.extract_stack()) if _model_frame(f.filename)),
            None,
        )
        where = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}" if frame else what
        if where not in self.specialized:
            self.specialized.append(where)
        return v

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        v = self._known(obj, "a branch")
        return super().to_bool(obj) if v is _UNKNOWN else bool(v)

    def iter(self, obj: fx.Proxy) -> Any:
        v = self._known(obj, "a loop")
        if v is _UNKNOWN or not hasattr(v, "__len__"):
            return super().iter(obj)
        return iter([obj[i] for i in range(len(v))])


class _Proxy(fx.Proxy):
    """fx's proxy, where a shape-derived value must become a Python value known from the
    example: ``len()`` (``x.reshape(*x.shape[:2], -1)``: Python asks the length of what it
    unpacks), ``int()`` / ``float()`` (Nest's ``int(math.sqrt(T))``). Not ``__index__``: torch
    would read sizes through it (``torch.zeros((b, h, w))``) and bake the batch size."""

    def _value(self, what: str) -> Any:
        tracer = self.tracer
        return tracer._known(self, what) if isinstance(tracer, _Tracer) else _UNKNOWN

    def __setitem__(self, key: Any, value: Any) -> None:
        # In-place writes into a slice (MViTv2's ``attn[:, :, 1:, 1:] = attn[...] + rel``):
        # a node of its own, run in order; later reads of the tensor see the write.
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __len__(self) -> int:
        v = self._value("len()")
        if v is _UNKNOWN or not hasattr(v, "__len__"):
            return super().__len__()
        return len(v)

    def __int__(self) -> int:
        v = self._value("int()")
        if v is _UNKNOWN:
            raise TypeError(f"int() of {self.node.name}, a value computed from tensor data")
        return int(v)

    def __float__(self) -> float:
        v = self._value("float()")
        if v is _UNKNOWN:
            raise TypeError(f"float() of {self.node.name}, a value computed from tensor data")
        return float(v)


class _NoAutocast:
    """``torch.autocast`` while tracing: takes any arguments, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@contextlib.contextmanager
def _autocast_untraced() -> Iterator[None]:
    """A graph records no context manager, so ``with torch.autocast(...)`` (timm's float32
    attention: ``device_type=v.device.type``) only ever ran on the tracer's side, where a
    traced device type stops it; during the trace it is a no-op (the graph computes in the
    caller's precision)."""
    saved = torch.autocast
    torch.autocast = _NoAutocast  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        torch.autocast = saved  # type: ignore[misc]


def split_example(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of an example input: a tensor, a tuple of positional arguments, or a
    dict of keyword arguments."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _model_frame(filename: str) -> bool:
    """True for a frame in the model's own code (not torch, not qat, not generated)."""
    path = str(Path(filename).resolve())
    return not path.startswith((_TORCH_DIR, _QAT_DIR)) and "<" not in filename


def _where(err: BaseException) -> str | None:
    """``file:line: code`` of the innermost frame in the model's own code (not torch, not qat)."""
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        if _model_frame(frame.filename):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return None


def _concrete_args(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict:
    """Defaults of the forward arguments the example does not give, baked into the graph."""
    sig = inspect.signature(model.forward)
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise CaptureError(
                f"forward of {type(model).__name__} takes *{p.name}: a graph needs named inputs"
            )
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as err:
        raise CaptureError(
            f"example_inputs do not fit {type(model).__name__}.forward: {err}"
        ) from None
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if name not in bound.arguments and p.default is not p.empty
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True))
    if isinstance(a, tuple | list):
        return isinstance(b, tuple | list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return True


@torch.no_grad()
def capture(
    model: nn.Module,
    example_inputs: Any = None,
    leaf_types: tuple[type[nn.Module], ...] = (),
) -> fx.GraphModule:
    """The model's forward as a ``GraphModule`` sharing its modules (traced in eval mode).

    With ``example_inputs``, forward arguments the example leaves out are fixed to their
    defaults, and the graph is checked to compute what the model computes on the example.

    Norm + activation modules (timm's ``BatchNormAct2d``) are split in ``model`` first
    (:func:`~qat.quant.norm_act.split_norm_act`), so the rewrite folds them like conv → BN.

    Raises:
        CaptureError: the forward cannot be traced (``where`` names the line that stopped it),
            or the graph computes something else than the model on the example.
    """
    split_norm_act(model)
    args, kwargs = split_example(example_inputs)
    concrete = _concrete_args(model, args, kwargs) if example_inputs is not None else None
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        example = None
        if example_inputs is not None:
            sig = inspect.signature(model.forward)
            example = dict(sig.bind_partial(*args, **kwargs).arguments)
        tracer = _Tracer(tuple(leaf_types), example)
        try:
            with _autocast_untraced():
                graph = tracer.trace(model, concrete_args=concrete)
        except Exception as err:
            where = _where(err)
            first = (str(err).strip().splitlines() or [""])[0]
            raise CaptureError(f"{type(err).__name__}: {first}", where) from err
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        gm.qat_specialized = list(tracer.specialized)
        if example_inputs is not None:
            expected = model(*args, **kwargs)
            try:
                got = gm(*args, **kwargs)
            except Exception as err:
                raise CaptureError(
                    f"the captured graph fails on example_inputs ({type(err).__name__}: "
                    f"{(str(err).strip().splitlines() or [''])[0]})",
                    _where(err),
                ) from err
            if not _same(expected, got):
                raise CaptureError(
                    "the captured graph computes another output than the model on "
                    "example_inputs (Python control flow on tensor values?)"
                )
    finally:
        for m, training in modes:
            m.training = training
    return gm


def is_captured(model: nn.Module) -> bool:
    """True when ``model`` runs a captured graph (:func:`adopt_graph`)."""
    return bool(getattr(type(model), "qat_captured", False))


def adopt_graph(model: nn.Module, graph: fx.Graph) -> nn.Module:
    """Make ``graph`` (captured from ``model``, then rewritten) ``model``'s forward, in place.

    ``model`` keeps its class (as a subclass whose ``forward`` is the graph's generated code),
    its attributes, methods and module tree (``Sequential`` containers included), so it deep
    copies, indexes and saves its ``state_dict`` like the model its authors wrote. The code
    is in ``model.qat_graph_code``.
    """
    code_module = fx.GraphModule(model, graph, class_name=type(model).__name__)
    # get_attr targets fx made for constants (``_tensor_constant0``) live on the code module.
    for node in graph.nodes:
        if node.op == "get_attr" and not _has_path(model, node.target):
            setattr(model, node.target, getattr(code_module, node.target))
    cls = type(model)
    if is_captured(model):
        cls = cls.__mro__[1]
    captured = type(
        cls.__name__,
        (cls,),
        {
            "forward": type(code_module).forward,
            "qat_captured": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )
    model.__class__ = captured
    model.qat_graph_code = code_module.code
    return model


def _has_path(model: nn.Module, target: str) -> bool:
    obj: Any = model
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
