"""fold-bn: fold an eval-mode batch norm into the convolution or linear layer before it."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.graph import attr_path
from graphopt.ir.rules import Call, Const, Match, Rule
from graphopt.passes.lib.patterns import module_of
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten

CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
LINEARS = (aten.linear.default,)


def _weight(gm: GraphModule, arg: object) -> torch.Tensor | None:
    """The tensor behind a get_attr argument; None for a missing (None) argument."""
    if isinstance(arg, Node) and arg.op == "get_attr":
        return attr_path(gm, str(arg.target))
    return None


def _fold(out: Node, bn_args: tuple[object, ...], eps: float) -> Match | None:
    """batch_norm(layer(x, w, b)) -> layer(x, w * s, (b - mean) * s + beta), s = gamma/sqrt(var+eps).

    ``out`` is the node that yields the normalized tensor; ``bn_args`` are the batch norm's
    (input, weight, bias, running_mean, running_var).
    """
    layer, gamma_n, beta_n, mean_n, var_n = bn_args
    if not isinstance(layer, Node) or len(layer.users) != 1:
        return None
    is_conv = layer.target in CONVS
    if not (is_conv or layer.target in LINEARS):
        return None
    if layer.target == aten.convolution.default and layer.args[6]:  # transposed
        return None
    if not is_conv and len(layer.meta["val"].shape) != 2:  # BatchNorm1d over linear's features
        return None
    gm = module_of(out)
    w = _weight(gm, layer.args[1])
    bias_arg = layer.args[2] if len(layer.args) > 2 else None
    b = _weight(gm, bias_arg)
    mean, var = _weight(gm, mean_n), _weight(gm, var_n)
    gamma, beta = _weight(gm, gamma_n), _weight(gm, beta_n)
    if w is None or mean is None or var is None or (bias_arg is not None and b is None):
        return None
    if (gamma_n is not None and gamma is None) or (beta_n is not None and beta is None):
        return None
    f64 = torch.float64
    scale = torch.rsqrt(var.to(f64) + eps) * (gamma.to(f64) if gamma is not None else 1.0)
    shift = (beta.to(f64) if beta is not None else 0.0) - mean.to(f64) * scale
    new_w = (w.to(f64) * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    new_b = ((b.to(f64) * scale if b is not None else 0.0) + shift).to(w.dtype)
    w_node = Const(new_w, f"{layer.name}_weight_bn")
    b_node = Const(new_b, f"{layer.name}_bias_bn")
    args = (layer.args[0], w_node, b_node, *layer.args[3:])
    return Match([layer, out], Call(layer.target, args, dict(layer.kwargs)))


def _batch_norm(bn: Node) -> Match | None:
    # aten.batch_norm(input, weight, bias, mean, var, training, momentum, eps, cudnn_enabled)
    if bn.args[5] is not False:
        return None
    return _fold(bn, tuple(bn.args[:5]), float(bn.args[7]))


def _batch_norm_no_training(getitem: Node) -> Match | None:
    # getitem(_native_batch_norm_legit_no_training(input, weight, bias, mean, var, momentum, eps), 0)
    bn = getitem.args[0]
    if not (
        isinstance(bn, Node) and bn.target == aten._native_batch_norm_legit_no_training.default
    ):
        return None
    others_dead = all(u is getitem or not u.users for u in bn.users)  # mean/invstd unused
    if getitem.args[1] != 0 or not others_dead:
        return None
    return _fold(getitem, tuple(bn.args[:5]), float(bn.args[6]))


BATCH_NORMS = (aten.batch_norm.default,)
GETITEMS = (operator.getitem,)

RULES = [
    Rule("batch-norm", BATCH_NORMS, _batch_norm),  # batch_norm(conv(x, w, b)) -> conv(x, w', b')
    Rule("bn-no-training", GETITEMS, _batch_norm_no_training),  # bn(linear(x))[0] -> linear'(x)
]


@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(RulePass):
    """Fold eval-mode batch norm into the preceding conv (1d/2d/3d, with or without bias) or
    linear layer, creating new weight tensors (the model's own are never touched).

    before:  %c = conv2d(%x, %w, None, ...); %y = batch_norm(%c, %g, %b, %m, %v, False, 0.1, 1e-5)
    after:   %y = conv2d(%x, %w_bn, %b_bn, ...)
    """

    name = "fold-bn"
    contract = Contract.rounding()
    runs_before = ("int8", "prune", "prune-channels", "sparsify-24", "fuse-pointwise")
    rules = RULES
    stat = "folded"
    logged = False  # cleanup, not fusion: it stays out of the "why (not) fused" table
