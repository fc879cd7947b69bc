"""`python -m foak_compile explain MODEL`: a tiny replica of each matrix family fuses what the model matrix
expects of that family, from a model type, a config.json or a model directory, dense or NF4; bad input
exits nonzero with a message that names it."""

import json
import os
import subprocess
import sys

import pytest
import transformers as tf

from foak_compile.__main__ import main
from foak_compile.explain import explain, to_text
from tests.matrix import FAMILIES, build, expected_counts

ROOT = os.path.join(os.path.dirname(__file__), "..")
# the transformers families of the matrix; one in the fast tier, the sweep in the slow one (~6 s each)
SWEEP = [
    f if f == "llama" else pytest.param(f, marks=pytest.mark.slow)
    for f, (cfg, _, _) in FAMILIES.items()
    if cfg is not None
]


def _model_type(family: str) -> str:
    return getattr(tf, FAMILIES[family][0]).model_type


def assert_matches_matrix(res: dict, family: str, loss_only: bool = False) -> None:
    """The replica's counts are the model matrix's expectations for `family` (its own tiny model, built
    with as many layers), every layer alike, rope in the layers, the loss in the whole model; LoRA
    fused once per adapted projection of every layer, as the matrix's LoRA variant asserts."""
    matrix = build(family)
    expected = expected_counts(matrix, family)
    if loss_only:  # as test_loss_only_compile_fuses_lm_head_and_loss expects
        expected = {**expected, "linear_cross_entropy": 1}
        del expected["cross_entropy"]
    assert res["tiny"]["num_hidden_layers"] == matrix.config.num_hidden_layers
    assert res["per_layer"] is not None, res["layers"]
    totals = {p: res["totals"].get(p, 0) for p in expected}
    assert totals == expected, (res["summary"], res["near_misses"])
    assert "rope" not in res["whole_model"]
    assert set(res["whole_model"]) - {"rms_norm"} == {"linear_cross_entropy" if loss_only else "cross_entropy"}
    if res["lora"]:
        assert res["per_layer"]["lora"] == len(res["lora"]["targets"]), res["summary"]


@pytest.mark.parametrize("family", SWEEP)
def test_model_type_fuses_what_the_matrix_expects(family):
    res = explain(_model_type(family))
    assert res["source"] == "model type" and res["lora"]["targets"]
    assert_matches_matrix(res, family)
    assert res["summary"].startswith(f"{res['model_type']} ({res['architecture']}), 2 tiny layers, LoRA r=8 on ")
    for m in res["near_misses"]:  # every near-miss says why
        assert m["reason"]


def test_config_json_path_loss_only(tmp_path):
    build("qwen3").config.save_pretrained(tmp_path)  # the matrix's own qwen3 config
    res = explain(str(tmp_path / "config.json"), lora="attn", loss_only=True)
    assert res["source"] == "config.json" and res["real_layers"] == 2
    assert all(t.startswith("self_attn.") for t in res["lora"]["targets"])
    assert_matches_matrix(res, "qwen3", loss_only=True)
    assert not [m for m in res["near_misses"] if m["pattern"] == "linear_cross_entropy"]


@pytest.mark.slow  # the CLI end to end on a 1B-shaped config
def test_model_directory_through_the_cli(tmp_path, capsys):
    """A Llama-3.2-1B-shaped config (GQA 4:1, llama3 rope scaling, tied embeddings) saved as a checkpoint
    directory; --json prints only the dict on stdout."""
    tf.LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ).save_pretrained(tmp_path)
    assert main(["explain", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "directory" and res["real_layers"] == 16
    t = res["tiny"]
    assert t["num_attention_heads"] == 4 * t["num_key_value_heads"]  # the GQA ratio kept
    assert res["kept"]["rope"] == "llama3" and res["kept"]["tied embeddings"]
    assert_matches_matrix(res, "llama")
    assert all(m["layer"] in (0, 1) for g in res["graphs"] for m in g["matches"] if m["pattern"] == "rope")


@pytest.mark.slow  # bitsandbytes quantisation on the CPU
def test_nf4_base(capsys):
    pytest.importorskip("bitsandbytes")
    assert main(["explain", "llama", "--quant", "nf4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["quant"] == "nf4"
    assert_matches_matrix(res, "llama")
    text = to_text(res)
    assert text.startswith("llama (LlamaForCausalLM), 2 tiny layers, LoRA r=8 on 7 projections, NF4 base")
    assert "per layer: lora 7," in text and "NEAR-MISS linear_cross_entropy (whole model)" in text
    lora = [m for g in res["graphs"] for m in g["matches"] if m["pattern"] == "lora"]
    assert lora and all("bitsandbytes 4-bit nf4" in m["variant"] for m in lora)


def test_unknown_model_type_exits_nonzero_with_its_name(capsys):
    r = subprocess.run(
        [sys.executable, "-m", "foak_compile", "explain", "not_a_model"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and r.stdout == ""
    assert "unknown model type 'not_a_model'" in r.stderr, r.stderr
    assert main(["explain", "lama"]) == 2
    assert "did you mean llama" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["--help"])
    assert ex.value.code == 0 and "explain" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    assert "--loss-only" in capsys.readouterr().out
