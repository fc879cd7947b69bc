"""The train-step benchmark's harness on the CPU: what it reports is what the device runs report."""

import json
import subprocess
import sys

import pytest

from benchmarks import train_step


def test_warnings_are_counted_by_message():
    err = "\n".join(
        [
            "W1205 21:49:43.123000 1234 torch/_inductor/select_algorithm.py:42] Constructing input/output tensor meta failed for Extern Choice",
            "W1205 21:49:44.5 1234 torch/_inductor/select_algorithm.py:42] Constructing input/output tensor meta failed for Extern Choice",
            "/x/peft/tuners/lora/layer.py:243: PeftWarning: layer 7 has no bias",
            "an ordinary line",
        ]
    )
    assert train_step.warnings_of(err) == {
        "torch/_inductor/select_algorithm.py: Constructing input/output tensor meta failed for Extern Choice": 2,
        "PeftWarning: layer N has no bias": 1,
    }


def test_rows_compare_against_their_own_inductor_row():
    rows = [
        dict(
            variant="inductor",
            quant="none",
            shape="1b",
            tokens_per_s=100,
            mem_gib=10.0,
            first_step_s=50.0,
            warnings={"a": 1},
        ),
        dict(
            variant="foak",
            quant="none",
            shape="1b",
            tokens_per_s=130,
            mem_gib=8.0,
            first_step_s=55.0,
            warnings={"a": 1, "b": 3},
        ),
        dict(variant="trainer_inductor", quant="none", shape="1b", tokens_per_s=90, mem_gib=10.0, first_step_s=40.0),
        dict(variant="trainer_foak", quant="none", shape="1b", tokens_per_s=120, mem_gib=7.0, first_step_s=44.0),
        dict(variant="foak", quant="nf4", shape="1b", tokens_per_s=1, mem_gib=1.0, first_step_s=1.0),
    ]
    train_step.compare(rows)
    assert rows[1]["vs_inductor"] == {"tokens_per_s": 1.3, "peak_mem": 0.8, "first_step": 1.1}
    assert rows[1]["extra_warnings"] == {"b": 3}
    assert rows[3]["vs_inductor"]["tokens_per_s"] == round(120 / 90, 3)  # against the Trainer's own inductor
    assert "vs_inductor" not in rows[4]  # no NF4 inductor row to compare with


def test_merged_calls_compare_only_within_a_call(tmp_path):
    """Calls merged into one file (one device call per base): a row never takes its ratios from
    another call's inductor row, whose machine state may differ."""

    def call(name, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"env": {"gpu": "x"}, "matmul_tflops": 800.0, "rows": rows}))
        return str(path)

    row = lambda v, tps: dict(variant=v, quant="none", shape="1b", tokens_per_s=tps, mem_gib=8.0, first_step_s=9.0)
    out = tmp_path / "merged.json"
    train_step.merge(
        [call("a.json", [row("inductor", 100), row("foak", 130)]), call("b.json", [row("foak_loss", 140)])], str(out)
    )
    merged = json.loads(out.read_text())
    assert [r["run"] for r in merged["rows"]] == ["a.json", "a.json", "b.json"]
    assert merged["rows"][1]["vs_inductor"]["tokens_per_s"] == 1.3
    assert "vs_inductor" not in merged["rows"][2]
    assert [r["run"] for r in merged["runs"]] == ["a.json", "b.json"]


@pytest.mark.slow
def test_trainer_route_runs_fused_on_cpu(tmp_path):
    """The documented Trainer route through the harness, tiny shape: one RESULT row whose compiled graph
    fused lm_head + loss (compile_for_trainer(loss_only=True) drops the logits)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.train_step",
            "--variant",
            "trainer_foak",
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--steps",
            "1",
            "--seq",
            "17",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and line, out.stderr[-3000:]
    row = json.loads(line[-1][len("RESULT ") :])
    assert row["foak_matches"]["linear_cross_entropy"] == 1 and row["foak_matches"]["lora"] == 14, row
    assert row["steps"] == 1 and row["tokens_per_s"] > 0


def test_step_breakdown_sorts_device_time_by_kind():
    from types import SimpleNamespace as NS

    from benchmarks.train_step import breakdown

    def op(key, shapes, us):
        return NS(key=key, input_shapes=shapes, device_time_total=us)

    def kernel(name, us):
        return NS(name=name, time_range=NS(elapsed_us=lambda: us))

    ops = [
        op("aten::mm", [[4096, 2048], [2048, 8192]], 100.0),  # base projection
        op("aten::mm", [[4096, 2048], [2048, 16]], 7.0),  # LoRA A (rank 16)
        op("aten::mm", [[1024, 2048], [2048, 128256]], 30.0),  # lm_head chunk
        op("aten::add", [[4096, 2048]], 5.0),  # not a GEMM op: counted through its kernel
    ]
    kernels = [
        kernel("nvjet_sm90_tst_256x128", 130.0),
        kernel("nvjet_sm90_small", 9.0),  # 2 µs more GEMM kernel time than the ops claim
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 40.0),
        kernel("_dequant_4bit", 11.0),
        kernel("kDequantizeBlockwise", 4.0),
        kernel("_ce_bwd", 6.0),
        kernel("triton_poi_fused_add_view_3", 5.0),
        kernel("_rms_norm_fwd", 3.0),
        kernel("multi_tensor_apply_kernel", 2.0),
    ]
    got = breakdown(ops, kernels, rank=16, vocab=128256)
    assert got == dict(
        base_gemm=100.0,
        lora_gemm=7.0,
        lm_head_gemm=30.0,
        dequant=15.0,
        attention=40.0,
        loss=6.0,
        optimizer=2.0,
        memory_bound=8.0,
        other_gemm=2.0,
    )
