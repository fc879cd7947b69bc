"""foak_compile.config: the environment variables' meaning, and patch / configure / use over them."""

import ast
import dataclasses

import pytest

import foak_compile
from foak_compile import Config, config
from foak_compile.kernels import cross_entropy_online as online
from foak_compile.ops import dequant


@pytest.mark.parametrize(
    "env,want",
    [
        ({}, Config()),
        ({"FOAK_INLINE": "1", "FOAK_TTIR_CACHE": "0"}, Config(inline=True, ttir_cache=False)),
        ({"FOAK_INLINE": "0", "FOAK_TTIR_CACHE": "1"}, Config(inline=False)),
        ({"FOAK_INLINE": " lora, rms_norm,"}, Config(inline=frozenset({"lora", "rms_norm"}))),
        ({"FOAK_INLINE": ""}, Config(inline=frozenset())),  # set but empty: no op inlined
        ({"FOAK_OPAQUE_DEQUANT": "1", "FOAK_LCE_ONLINE": "0"}, Config(opaque_dequant=True, lce_online=False)),
        ({"FOAK_OPAQUE_DEQUANT": "yes", "FOAK_LCE_ONLINE": ""}, Config()),  # neither 1 nor 0: automatic
        (
            {"FOAK_CHECKPOINT_SIDE_EFFECTS": "0", "FOAK_DUMP_DIR": "/tmp/d"},
            Config(checkpoint_side_effects=False, dump_dir="/tmp/d"),
        ),
        ({"FOAK_CHECKPOINT_SIDE_EFFECTS": "no", "FOAK_DUMP_DIR": ""}, Config()),
    ],
)
def test_from_env(env, want):
    assert config.from_env(env) == want


def test_every_knob_has_a_docstring():
    tree = ast.parse(open(config.__file__).read())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config").body
    documented = {
        a.target.id
        for a, doc in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    }
    assert documented == {f.name for f in dataclasses.fields(Config)}


def test_patch_nests_and_restores(monkeypatch):
    monkeypatch.setenv("FOAK_LCE_ONLINE", "0")
    monkeypatch.setenv("FOAK_DUMP_DIR", "from-env")
    assert config.current().lce_online is False  # read when asked, not at import
    with config.patch(lce_online=True) as outer:
        assert outer.lce_online is True and outer.dump_dir == "from-env"
        with config.patch(dump_dir="inner", lce_online=None):
            assert config.current() == dataclasses.replace(Config(), lce_online=None, dump_dir="inner")
        assert config.current().lce_online is True and config.current().dump_dir == "from-env"
    assert config.current().lce_online is False
    with pytest.raises(TypeError):
        with config.patch(no_such_knob=1):
            pass


def test_configure_use_and_reset(monkeypatch):
    monkeypatch.delenv("FOAK_OPAQUE_DEQUANT", raising=False)
    try:
        assert config.configure(opaque_dequant=True).opaque_dequant is True
        assert dequant.opaque()
        with config.use(Config()):
            assert config.current() == Config() and not dequant.opaque()
        with config.patch(cuda_graphs=True, opaque_dequant=None):
            assert dequant.opaque()
        assert config.current().opaque_dequant is True
    finally:
        config.reset()
    assert config.current() == config.from_env()


def test_lce_online_knob_reaches_the_size_rule(monkeypatch):
    monkeypatch.delenv("FOAK_LCE_ONLINE", raising=False)
    with config.patch(lce_online=False):
        assert not online.preferred(10**6, 10**5, 10**6)
    assert "lce_online" not in config._overrides  # undone, no override left
    assert foak_compile.Config is Config
