"""The LoRA ops' declared argument layouts (ops/lora_schema.py) match the registered ops, and patterns
reach the ops only through foak_compile.ops."""

import ast
import os

import pytest
import torch
from torch.fx import Graph

from foak_compile.ops import lora_schema as schema

PATTERNS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "foak_compile", "patterns")


@pytest.mark.parametrize("layout", schema.layouts(), ids=lambda lay: lay.op_name)
def test_layout_names_the_registered_schema(layout):
    assert tuple(a.name for a in layout.op._schema.arguments) == layout.fields


def test_every_lora_op_has_a_layout():
    registered = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("foak::lora_linear")]
    assert {n for n in registered if not n.endswith("_backward")} == {lay.op_name for lay in schema.layouts()}


def test_a_drifted_layout_fails_its_check():
    lay = schema.DENSE.single
    swapped = schema.Layout(lay.op_name, (lay.fields[0], lay.fields[2], lay.fields[1]) + lay.fields[3:])
    with pytest.raises(RuntimeError, match="lora_schema.py"):
        swapped.check()


def test_the_family_shape():
    for f in schema.FAMILIES:
        assert f.single.fields[1 : len(f.tensors) + 1] == f.tensors and f.weight == f.tensors[0]
        assert f.single.fields[-len(f.consts) - 1 : -1] == f.consts
        assert f.swiglu is None or f.swiglu.fields == ("gate", "up") + f.single.fields[1:]
        assert "dropout_p" not in f.siblings.fields and len(f.siblings.fields) == len(f.single.fields) - 1
    assert schema.family_of(schema.BNB4.single.op) is schema.BNB4
    assert schema.family_of(schema.BNB4.siblings.op) is None and schema.family_of(torch.mm) is None


def _dense_named(**over):
    named = dict(
        x="x", weight="w", bias=None, lora_a="a", lora_b="b", scaling=2.0, dropout_p=0.0, out_dtype=torch.float32
    )
    return {**named, **over}


def test_build_and_parse_round_trip():
    lay = schema.DENSE.single
    g = Graph()
    x = g.placeholder("x")
    args = lay.build(**_dense_named(x=x))
    assert args[0] is x and args[-1] == torch.float32 and len(args) == len(lay.fields)
    call = g.call_function(lay.op, args)
    view = lay.parse(call)
    assert view.x is x and view.scaling == 2.0 and view.bias is None and lay.arg(call, "x") is x
    # anything else is not the form patterns write: keywords, another arity, another op
    assert lay.parse(g.call_function(lay.op, args[:-1], {"out_dtype": torch.float32})) is None
    assert lay.parse(g.call_function(lay.op, args + (1,))) is None
    assert lay.parse(g.call_function(schema.BNB4.single.op, args)) is None
    assert lay.arg(g.call_function(lay.op, ()), "x") is None


def test_build_wants_every_field_and_no_other():
    lay = schema.DENSE.single
    with pytest.raises(TypeError):
        lay.build(**{k: v for k, v in _dense_named().items() if k != "bias"})
    with pytest.raises(TypeError):
        lay.build(**_dense_named(bogus=1))


def test_group_takes_columns_and_shares_the_rest():
    lay = schema.BNB4.single
    layers = [lay.view(f"{f}{i}" for f in lay.fields) for i in (1, 2)]
    args = schema.BNB4.siblings.Args(*schema.BNB4.group(layers, x="x", scalings=[1.0, 2.0], weight_shapes=[4, 3, 5, 3]))
    assert args.x == "x" and args.qweights == ["qweight1", "qweight2"] and args.biases == ["bias1", "bias2"]
    assert args.nested_absmaxes == ["nested_absmax1", "nested_absmax2"] and args.scalings == [1.0, 2.0]
    assert args.quant_type == "quant_type1" and args.out_dtype == "out_dtype1" and args.weight_shapes == [4, 3, 5, 3]


def test_grads_fill_none():
    lay = schema.DENSE.single
    need = [True, False, True, False, True, False, False, False]
    assert lay.grads(need, x="dx", bias="db", lora_a="da", lora_b="dB") == (
        "dx",
        None,
        "db",
        None,
        "dB",
        None,
        None,
        None,
    )
    assert lay.grads(x="dx", lora_a="da") == ("dx", None, None, "da", None, None, None, None)
    with pytest.raises(TypeError):
        lay.grads(dx="dx")


def test_patterns_import_no_kernels():
    for name in sorted(os.listdir(PATTERNS)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(PATTERNS, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            assert not any("kernels" in m.split(".") for m in mods), f"patterns/{name} imports {mods}"
