"""Generic parameter-name mapping between vlp's flat params and a PyTorch state dict, both ways.

A `Rule` ties torch tensors to vlp params (usually one to one; fused/split q, k, v are one to three) with a
forward conversion (vlp -> torch) and a backward one (torch -> vlp, given the vlp shapes the model expects).
The per-target modules (`hf_clip.py`, `hf_siglip.py`, `open_clip.py`) only list rules; this module applies them
and checks names and shapes, so every target reports a mismatch the same way.

Layouts: a vlp `Linear` kernel is [*in, *out] and computes x @ K; a torch `nn.Linear` weight is [out, in] and
computes x @ W.T. A flax `Conv` kernel is [kh, kw, in, out]; a torch `Conv2d` weight is [out, in, kh, kw].
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

Arrays = list[np.ndarray]
Shapes = list[tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: tuple[str, ...]
    vlp: tuple[str, ...]
    to_torch: Callable[[Arrays], Arrays]
    from_torch: Callable[[Arrays, Shapes], Arrays]


class MappingError(ValueError):
    """A state dict does not fit the model: a missing, unexpected or wrongly shaped tensor."""


def same(torch_name: str, vlp_name: str, torch_shape: tuple[int, ...] | None = None) -> Rule:
    """The same numbers, reshaped if the two sides store them with different (size-compatible) shapes."""
    def to_torch(a: Arrays) -> Arrays:
        return [a[0] if torch_shape is None else a[0].reshape(torch_shape)]

    return Rule((torch_name,), (vlp_name,), to_torch, lambda t, shapes: [t[0].reshape(shapes[0])])


def linear(torch_prefix: str, vlp_prefix: str, num_in: int = 1, bias: bool = True) -> list[Rule]:
    """torch `nn.Linear` (weight [out, in], bias [out]) <-> vlp `Linear` (kernel [*in, *out], bias [*out])."""
    def to_torch(a: Arrays) -> Arrays:
        kernel = a[0]
        return [kernel.reshape(int(np.prod(kernel.shape[:num_in])), -1).T]

    rules = [Rule((f"{torch_prefix}.weight",), (f"{vlp_prefix}/kernel",), to_torch,
                  lambda t, shapes: [t[0].T.reshape(shapes[0])])]
    if bias:
        rules.append(same(f"{torch_prefix}.bias", f"{vlp_prefix}/bias", (-1,)))
    return rules


def layer_norm(torch_prefix: str, vlp_prefix: str) -> list[Rule]:
    return [same(f"{torch_prefix}.weight", f"{vlp_prefix}/scale"), same(f"{torch_prefix}.bias", f"{vlp_prefix}/bias")]


def conv(torch_name: str, vlp_name: str) -> Rule:
    """torch Conv2d weight [out, in, kh, kw] <-> flax Conv kernel [kh, kw, in, out]."""
    return Rule((torch_name,), (vlp_name,), lambda a: [a[0].transpose(3, 2, 0, 1)],
                lambda t, shapes: [t[0].transpose(2, 3, 1, 0)])


def split_qkv(torch_prefixes: Sequence[str], vlp_prefix: str) -> list[Rule]:
    """Three torch Linears (q, k, v: weight [D, D]) <-> one vlp fused kernel [D, 3, heads, head_dim]."""
    weights = tuple(f"{p}.weight" for p in torch_prefixes)
    biases = tuple(f"{p}.bias" for p in torch_prefixes)

    def kernel_to_torch(a: Arrays) -> Arrays:
        k = a[0]
        return [k[:, i].reshape(k.shape[0], -1).T for i in range(3)]

    def kernel_from_torch(t: Arrays, shapes: Shapes) -> Arrays:
        d, _, heads, head_dim = shapes[0]
        return [np.stack([w.T.reshape(d, heads, head_dim) for w in t], axis=1)]

    return [
        Rule(weights, (f"{vlp_prefix}/kernel",), kernel_to_torch, kernel_from_torch),
        Rule(biases, (f"{vlp_prefix}/bias",), lambda a: [a[0][i].reshape(-1) for i in range(3)],
             lambda t, shapes: [np.stack(t).reshape(shapes[0])]),
    ]


def fuse_qkv(torch_prefix: str, vlp_prefixes: Sequence[str]) -> list[Rule]:
    """One torch in_proj (weight [3D, D], rows q; k; v) <-> three vlp kernels [D, heads, head_dim]."""
    def kernel_to_torch(a: Arrays) -> Arrays:
        return [np.concatenate([k.reshape(k.shape[0], -1).T for k in a], axis=0)]

    def kernel_from_torch(t: Arrays, shapes: Shapes) -> Arrays:
        return [w.T.reshape(s) for w, s in zip(np.split(t[0], 3, axis=0), shapes, strict=True)]

    def bias_from_torch(t: Arrays, shapes: Shapes) -> Arrays:
        return [b.reshape(s) for b, s in zip(np.split(t[0], 3), shapes, strict=True)]

    return [
        Rule((f"{torch_prefix}_weight",), tuple(f"{p}/kernel" for p in vlp_prefixes), kernel_to_torch,
             kernel_from_torch),
        Rule((f"{torch_prefix}_bias",), tuple(f"{p}/bias" for p in vlp_prefixes),
             lambda a: [np.concatenate([b.reshape(-1) for b in a])], bias_from_torch),
    ]


def to_state_dict(rules: Sequence[Rule], flat_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """vlp flat params -> {torch name: fp32 array}; every vlp param must be used by exactly one rule."""
    used = [name for rule in rules for name in rule.vlp]
    missing = sorted(set(used) - set(flat_params))
    if missing:
        raise MappingError(f"the vlp params lack {missing[:5]} (the mapping expects them); is this the model the "
                           f"config describes?")
    unused = sorted(set(flat_params) - set(used))
    if unused:
        raise MappingError(f"vlp params {unused[:5]} have no place in the target format; the model uses options "
                           "the target cannot represent")
    out = {}
    for rule in rules:
        arrays = rule.to_torch([np.asarray(flat_params[n], np.float32) for n in rule.vlp])
        out.update({n: np.array(a, np.float32, order="C") for n, a in zip(rule.torch, arrays, strict=True)})
    return out


def from_state_dict(rules: Sequence[Rule], state_dict: Mapping[str, np.ndarray],
                    expected: Mapping[str, tuple[int, ...]], ignore: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """{torch name: array} -> vlp flat params with the `expected` shapes (vlp name -> shape).

    Names and shapes are checked on the torch side: the expected torch shape is what the forward conversion
    makes of zeros of the expected vlp shapes, so a mismatch names the tensor, the expected and the found shape.
    Tensors whose names contain one of `ignore` (buffers such as `position_ids`) are skipped.
    """
    needed = [name for rule in rules for name in rule.torch]
    missing = [n for n in needed if n not in state_dict]
    if missing:
        raise MappingError(f"the state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                           f"({len(missing)} missing); is it the architecture the config describes?")
    extra = sorted(n for n in state_dict if n not in set(needed) and not any(i in n for i in ignore))
    if extra:
        raise MappingError(f"the state dict has tensors the vlp model has no place for: {extra[:5]}"
                           f"{' ...' if len(extra) > 5 else ''}; the checkpoint uses options vlp does not map")
    out = {}
    for rule in rules:
        shapes = [tuple(expected[n]) for n in rule.vlp]
        want = rule.to_torch([np.zeros(s, np.float32) for s in shapes])
        found = [np.asarray(state_dict[n], np.float32) for n in rule.torch]
        for name, w, f in zip(rule.torch, want, found, strict=True):
            if w.shape != f.shape:
                raise MappingError(f"parameter {name}: expected shape {w.shape} (vlp {', '.join(rule.vlp)} "
                                   f"{', '.join(map(str, shapes))}), found {f.shape}")
        out.update(zip(rule.vlp, rule.from_torch(found, shapes), strict=True))
    unmapped = sorted(set(expected) - set(out))
    if unmapped:
        raise MappingError(f"vlp params {unmapped[:5]} get no value from the state dict (the mapping has no rule "
                           "for them)")
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}


def encoder_rules(torch_prefix: str, vlp_prefix: str, depth: int, fused_qkv: bool, names: Mapping[str, str],
                  torch_fused_qkv: bool) -> list[Rule]:
    """Rules for `depth` pre-LN blocks. `names` maps vlp's block parts (ln_1, ln_2, attn, out, fc1, fc2, q, k, v,
    qkv) to the torch names inside one block; `torch_fused_qkv` says whether torch has one in_proj."""
    rules: list[Rule] = []
    for i in range(depth):
        t, v = f"{torch_prefix}.{i}", f"{vlp_prefix}/block_{i}"
        rules += layer_norm(f"{t}.{names['ln_1']}", f"{v}/ln_1")
        rules += layer_norm(f"{t}.{names['ln_2']}", f"{v}/ln_2")
        attn = f"{t}.{names['attn']}"
        vlp_qkv = [f"{v}/attn/{n}" for n in ("query", "key", "value")]
        if torch_fused_qkv and fused_qkv:
            rules += linear(f"{attn}.in_proj", f"{v}/attn/qkv")
            rules = rules[:-2] + [_rename(rules[-2], f"{attn}.in_proj_weight"),
                                  _rename(rules[-1], f"{attn}.in_proj_bias")]
        elif torch_fused_qkv:
            rules += fuse_qkv(f"{attn}.in_proj", vlp_qkv)
        elif fused_qkv:
            rules += split_qkv([f"{attn}.{names[n]}" for n in ("q", "k", "v")], f"{v}/attn/qkv")
        else:
            for n, vn in zip(("q", "k", "v"), vlp_qkv, strict=True):
                rules += linear(f"{attn}.{names[n]}", vn)
        rules += linear(f"{attn}.{names['out']}", f"{v}/attn/out", num_in=2)
        rules += linear(f"{t}.{names['fc1']}", f"{v}/mlp/fc1")
        rules += linear(f"{t}.{names['fc2']}", f"{v}/mlp/fc2")
    return rules


def _rename(rule: Rule, torch_name: str) -> Rule:
    return dataclasses.replace(rule, torch=(torch_name,))
