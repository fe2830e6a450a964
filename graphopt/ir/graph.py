"""Helpers over the one IR: a ``torch.fx.GraphModule`` of ATen (and ``graphopt::``) ops.

Invariants every pass may assume and must keep are listed in ``passes/README.md``.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

aten = torch.ops.aten

# Ops that consume randomness: never merged, folded or reordered.
_RANDOM_TAG = torch.Tag.nondeterministic_seeded


def op_nodes(gm: GraphModule) -> Iterator[Node]:
    """The nodes that compute something (not placeholders, parameters or the output)."""
    return (n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def count_op_nodes(gm: GraphModule) -> int:
    return sum(1 for _ in op_nodes(gm))


def count_weights(gm: GraphModule) -> int:
    """The stored tensors the graph reads (its ``get_attr`` nodes)."""
    return len(gm.graph.find_nodes(op="get_attr"))


def is_random(node: Node) -> bool:
    """Does the call draw random numbers? Eval-mode dropout (train=False) does not."""
    if node.target in _MAY_RETURN_INPUT:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if train is False:
            return False
    tags = getattr(node.target, "tags", ())
    return _RANDOM_TAG in tags


def _impure(node: Node) -> bool:
    try:
        return node.is_impure(impure_random=False)
    except TypeError:  # torch versions whose is_impure does not judge randomness
        return node.is_impure()


def is_pure(node: Node) -> bool:
    """True for a call whose only effect is its result: safe to delete, merge or fold."""
    # randomness is judged by is_random, which knows that eval-mode dropout draws none
    if node.op != "call_function" or _impure(node) or is_random(node):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False
    return True


# Ops that may return their input itself although their schema has no alias annotation.
_MAY_RETURN_INPUT = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}


def _aliases_input(user: Node, node: Node) -> bool:
    """Can ``user``'s result share memory with its argument ``node``?"""
    if user.op != "call_function":
        return False
    if user.target is operator.getitem or user.target in _MAY_RETURN_INPUT:
        return True
    schema = getattr(user.target, "_schema", None)
    if schema is None:
        return False
    aliased: set[str] = set()
    for ret in schema.returns:
        if ret.alias_info is not None:
            aliased |= set(ret.alias_info.before_set)
    for i, arg in enumerate(schema.arguments):
        value = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
        if (
            value is node
            and arg.alias_info is not None
            and aliased & set(arg.alias_info.before_set)
        ):
            return True
    return False


def escapes_to_output(node: Node) -> bool:
    """Does ``node``'s memory reach a graph output, directly or through views and aliases?

    A pass must not make such a value share memory with an input, a weight or another output
    (passes/README.md, invariant 5).
    """
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        for user in current.users:
            if user.op == "output":
                return True
            if user not in seen and _aliases_input(user, current):
                seen.add(user)
                stack.append(user)
    return False


def written_args(node: Node) -> list[Node]:
    """The graph values ``node`` writes into in place: its schema's ``Tensor(a!)`` arguments
    (``add_``'s self, ``copy_``'s destination, an ``out=`` tensor)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None or not schema.is_mutable:
        return []
    written: list[Node] = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        written += [v for v in values if isinstance(v, Node)]
    return written


def written_tensors(op: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors a call of ``op`` on these arguments writes into in place (run-time values:
    the dynamic counterpart of ``written_args``)."""
    schema = getattr(op, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    written: list[torch.Tensor] = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        written += [v for v in values if isinstance(v, torch.Tensor) and v.numel()]
    return written


def storage_key(t: torch.Tensor) -> int | None:
    """Identifies the memory behind a tensor: views and aliases share it. None for tensors
    without one storage (sparse, some subclasses): those are never matched."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def alias_root(node: Node) -> Node:
    """The node whose fresh memory ``node`` is a view or alias of (``node`` itself if none).

    ``x.clone()[:, 0]`` has the clone as its root; a placeholder, a weight or any call that
    allocates its result is its own root."""
    current = node
    while True:
        parent = next((p for p in current.all_input_nodes if _aliases_input(current, p)), None)
        if parent is None:
            return current
        current = parent


def written_roots(gm: GraphModule) -> dict[Node, Node]:
    """Every memory the graph writes into in place: its root (``alias_root``) -> the first node
    that writes it. Empty for a functional graph, which is what capture produces."""
    roots: dict[Node, Node] = {}
    for node in gm.graph.nodes:
        for target in written_args(node):
            roots.setdefault(alias_root(target), node)
    return roots


def is_written(node: Node) -> bool:
    """Does some node write in place into ``node``'s memory (through any view or alias)?"""
    stack, seen = [alias_root(node)], set()
    while stack:
        current = stack.pop()
        for user in current.users:
            if current in written_args(user):
                return True
            if user not in seen and _aliases_input(user, current):
                seen.add(user)
                stack.append(user)
    return False


def touches_written(node: Node) -> bool:
    """Does ``node``, or one of its inputs, share memory that some node writes in place? Its
    value then depends on when it is read: it must not be folded, merged or forwarded. Never
    true in a captured graph, which is functional; passes keep this check for graphs built by
    hand."""
    return any(is_written(n) for n in (node, *node.all_input_nodes))


def tensor_val(node: Any) -> torch.Tensor | None:
    """The FakeTensor recorded on a node, or None if the node is not a tensor value."""
    if not isinstance(node, Node):
        return None
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def fake_mode_of(gm: GraphModule) -> Any:
    """The FakeTensorMode the graph's metadata lives in (shared shape environment)."""
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(vals)
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def propagate_meta(gm: GraphModule) -> None:
    """Recompute ``meta["val"]`` for every node of ``gm`` from its placeholders' metadata."""
    mode = fake_mode_of(gm)
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def attr_path(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def tensors_of(gm: GraphModule) -> Iterable[torch.Tensor]:
    for _, t in named_tensors(gm):
        yield t


def named_tensors(gm: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Every weight of the module: parameters, buffers and plain tensor attributes."""
    yield from gm.named_parameters(remove_duplicate=False)
    yield from gm.named_buffers(remove_duplicate=False)
    for name, value in vars(gm).items():
        if isinstance(value, torch.Tensor) and not name.startswith("_"):
            yield name, value


def snapshot(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` whose graph can be edited freely; weight tensors are shared, not copied.

    Passes never mutate tensors in place (they create new ones), so sharing weights is safe and
    keeps a rollback point cheap.
    """
    memo: dict[int, Any] = {id(t): t for t in tensors_of(gm)}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if val is not None:
            memo[id(val)] = val
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation on copy
        return copy.deepcopy(gm, memo)


def short_target(node: Node) -> str:
    target = node.target
    if node.op == "get_attr":
        return f"get_attr[{target}]"
    if node.op == "call_module":
        return f"module[{target}]"
    if node.op == "call_method":
        return f"method[{target}]"
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        return f"{ns}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


_DTYPE_SHORT = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
}


def format_type(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ",".join(str(d) if isinstance(d, int) else "?" for d in val.shape)
        return f"{_DTYPE_SHORT.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, torch.SymInt):
        return "sym"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    return ""


def _format_arg(arg: Any) -> str:
    if isinstance(arg, Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"[{inner}]"
    if isinstance(arg, float):
        return f"{arg:.6g}"
    return repr(arg) if not isinstance(arg, torch.dtype) else str(arg)


def format_graph(gm: GraphModule) -> str:
    """A stable, line-per-node print of the graph, used by the golden-IR tests and reports."""
    lines = []
    for node in gm.graph.nodes:
        if node.op == "output":
            lines.append(f"return {_format_arg(node.args[0])}")
            continue
        if node.op == "placeholder":
            lines.append(f"%{node.name} = input : {format_type(node.meta.get('val'))}")
            continue
        args = [_format_arg(a) for a in node.args]
        args += [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
        typ = format_type(node.meta.get("val"))
        call = (
            short_target(node)
            if node.op == "get_attr"
            else f"{short_target(node)}({', '.join(args)})"
        )
        lines.append(f"%{node.name} = {call}" + (f" : {typ}" if typ else ""))
    return "\n".join(lines) + "\n"


def original_name(node: Node) -> str | None:
    """The name of the node of the captured graph whose value ``node`` stands for, if any.

    Nodes created by a pass carry provenance in ``meta["graphopt"]`` (see ``graphopt.ir.rewriter``);
    ``replaces`` is set only where the new node computes the same value as an original one.
    """
    info = node.meta.get("graphopt")
    if info is None:
        return node.name
    return info.get("replaces")
