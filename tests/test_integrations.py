"""The foak backend inside real training stacks on CPU: Hugging Face Trainer and TRL's SFTTrainer (tiny
Llama + peft LoRA, datasets built here, a few steps, against the same run in eager), gradient
checkpointing (loss and every LoRA gradient against eager, with and without checkpointing), and the
QLoRA example script in its tiny setting."""

import copy
import inspect
import math
import os

import pytest
import torch

import foak_compile
from foak_compile.integrations import compile_for_trainer, enable_gradient_checkpointing, prepare_gradient_checkpointing
from tests.models import batch, loss_and_grads
from tests.test_lora_pattern import PROJECTIONS, peft_llama

pytestmark = pytest.mark.slow  # Trainer and TRL runs

LAYERS = 2
# what a 2-layer Llama with LoRA on all seven projections contains
FULL = {
    "lora": 7 * LAYERS,
    "lora_siblings": 2 * LAYERS,
    "lora_swiglu": LAYERS,
    "rms_norm": 2 * LAYERS + 1,
    "rope": LAYERS,
    "cross_entropy": 1,
}
# with LoRA dropout each layer draws its own mask: q/k/v and gate/up stay single ops
FULL_DROPOUT = {k: v for k, v in FULL.items() if k != "lora_siblings"}


def _rows(vocab, n=16, seq=12, seed=0):
    """A learnable corpus: each row counts upwards from a random start."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(seq)) % vocab).tolist()


def _args(out, steps=4, gc=False, **kw):
    from transformers import TrainingArguments

    # gradient_checkpointing(_kwargs) is the name on transformers 5.17 and a deprecated alias on 5.24
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        **kw,
    )


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _trainer_run(model, out, compiled, gc, loss_only=False):
    import datasets
    from transformers import Trainer

    from foak_compile.integrations import FoakCallback

    rows = _rows(model.config.vocab_size)
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    callbacks = []
    if compiled:
        compile_for_trainer(model, inner="aot_eager", loss_only=loss_only)
        callbacks.append(FoakCallback())
    trainer = Trainer(model=model, args=_args(out, gc=gc), train_dataset=ds, callbacks=callbacks)
    trainer.train()
    return trainer, (callbacks[0] if callbacks else None)


_EAGER = {}


def _eager_trainer_losses(model, tmp_path):
    """The eager Trainer run without checkpointing: the reference of every compiled Trainer run."""
    if "trainer" not in _EAGER:
        trainer, _ = _trainer_run(model, tmp_path / "eager", compiled=False, gc=False)
        _EAGER["trainer"] = (_history(trainer, "loss"), _history(trainer, "grad_norm"))
    return _EAGER["trainer"]


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "gradient_checkpointing"])
def test_trainer(gc, tmp_path):
    torch.manual_seed(0)
    model = peft_llama(layers=LAYERS)
    ref_losses, ref_norms = _eager_trainer_losses(copy.deepcopy(model), tmp_path)
    trainer, cb = _trainer_run(model, tmp_path / "foak", compiled=True, gc=gc)
    losses, norms = _history(trainer, "loss"), _history(trainer, "grad_norm")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=0)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-3, atol=0)
    # Trainer kept the model object (no wrapper), so peft and saving see what they expect
    assert trainer.model is model
    assert cb.counts == FULL, [r.summary() for r in cb.reports]
    if gc:  # the layers ran as checkpointed regions, and foak rewrote inside them; one graph
        assert len(cb.reports) == 1 and "tag_activation_checkpoint" in cb.reports[0].code_before
    summary = (tmp_path / "foak" / "foak" / "summary.txt").read_text()
    assert "lora 14" in summary and "rope 2" in summary


def test_trainer_loss_only_fuses_the_lm_head(tmp_path):
    """compile_for_trainer(loss_only=True): training outputs carry no logits, so lm_head + loss are one
    linear_cross_entropy; the same losses as eager, and the logits are back in eval mode."""
    torch.manual_seed(0)
    model = peft_llama(layers=LAYERS)
    ref_losses, ref_norms = _eager_trainer_losses(copy.deepcopy(model), tmp_path)
    trainer, cb = _trainer_run(model, tmp_path / "foak", compiled=True, gc=False, loss_only=True)
    torch.testing.assert_close(_history(trainer, "loss"), ref_losses, rtol=1e-4, atol=0)
    torch.testing.assert_close(_history(trainer, "grad_norm"), ref_norms, rtol=1e-3, atol=0)
    expected = {k: v for k, v in FULL.items() if k != "cross_entropy"}
    assert cb.counts == {**expected, "linear_cross_entropy": 1}, [r.summary() for r in cb.reports]
    inputs = batch(model)
    model.train()
    out = model(**inputs)
    assert out.logits is None and "logits" not in out and out.loss is not None
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[-1] == model.config.vocab_size and out.loss is not None
    compile_for_trainer(model, inner="aot_eager", loss_only=True)  # a second call wraps once
    assert model._foak_full_forward.__func__ is not model.forward.__func__
    assert not getattr(model._foak_full_forward, "_foak_loss_only", False)
    # Trainer's column filter reads the signature; a deep copy (TRL's reference model) is its own model
    assert (
        list(inspect.signature(model.forward).parameters) == list(inspect.signature(type(model).forward).parameters)[1:]
    )
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin and twin._foak_full_forward.__self__ is twin
    twin.eval()
    model.train()
    with torch.no_grad():
        assert twin(**inputs).logits is not None and model(**inputs).logits is None


def test_training_args_backend_is_refused_by_accelerate(tmp_path):
    """Why compile_for_trainer exists: accelerate checks torch_compile_backend against a fixed list."""
    from transformers import Trainer

    model = peft_llama(layers=1)
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        Trainer(model=model, args=_args(tmp_path, torch_compile_backend="foak"))


def test_compile_for_trainer_wants_the_module():
    model = peft_llama(layers=1)
    with pytest.raises(TypeError, match="not a torch.compile wrapper"):
        compile_for_trainer(torch.compile(model, backend="eager"))


# --- TRL -------------------------------------------------------------------------------------------


def _word_tokenizer(n_words):
    """A real fast tokenizer built here (no hub): whitespace-split words w0..w{n-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _sft_run(model, out, compiled):
    import datasets
    from trl import SFTConfig, SFTTrainer

    from foak_compile.integrations import FoakCallback

    words = model.config.vocab_size - 3
    tok = _word_tokenizer(words)
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    texts = [" ".join(f"w{(start + j) % words}" for j in range(11)) for start in range(0, 16 * 7, 7)]
    callbacks = []
    if compiled:
        compile_for_trainer(model, inner="aot_eager")
        callbacks.append(FoakCallback())
    # SFTConfig's defaults: gradient checkpointing on (non-reentrant on transformers 5), bf16 (off on CPU)
    cfg = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        max_length=32,
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    assert cfg.gradient_checkpointing
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tok,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer, (callbacks[0] if callbacks else None)


def test_trl_sft_trainer(tmp_path):
    pytest.importorskip("trl")
    torch.manual_seed(0)
    model = peft_llama(layers=LAYERS)
    ref, _ = _sft_run(copy.deepcopy(model), tmp_path / "eager", compiled=False)
    trainer, cb = _sft_run(model, tmp_path / "foak", compiled=True)
    losses, ref_losses = _history(trainer, "loss"), _history(ref, "loss")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=0)
    counts = cb.counts
    # TRL computes the loss with its own chunked LM head (add_fused_lm_head), outside foak's reach:
    # no cross_entropy match; everything in the decoder layers is rewritten
    assert {k: counts.get(k) for k in ("lora", "lora_siblings", "rms_norm", "rope")} == {
        k: FULL[k] for k in ("lora", "lora_siblings", "rms_norm", "rope")
    }, [r.summary() for r in cb.reports]


# --- gradient checkpointing without Trainer ---------------------------------------------------------


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_gradient_checkpointing_parity(base):
    """Loss and every LoRA gradient: foak + non-reentrant checkpointing == eager with and without it."""
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    layers = LAYERS if base == "dense" else 1
    model = peft_llama(layers=layers, quantize=dict(quant_type="nf4") if base == "nf4" else None)
    model.train()
    inputs = batch(model, seed=0)
    plain_loss, plain_grads = loss_and_grads(copy.deepcopy(model), inputs)
    eager_gc = enable_gradient_checkpointing(copy.deepcopy(model))
    gc_loss, gc_grads = loss_and_grads(eager_gc, inputs)
    enable_gradient_checkpointing(model)
    be = foak_compile.backend(inner="aot_eager")
    loss, grads = loss_and_grads(model, inputs, call=torch.compile(model, backend=be))
    assert len(grads) == 2 * len(PROJECTIONS) * layers
    for ref_loss, ref_grads in ((plain_loss, plain_grads), (gc_loss, gc_grads)):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert len(be.reports) == 1, [r.summary() for r in be.reports]
    report = be.reports[0]
    assert report.code_before.count("tag_activation_checkpoint(") == layers
    want = {
        "lora": 7 * layers,
        "lora_siblings": 2 * layers,
        "lora_swiglu": layers,
        "rms_norm": 2 * layers + 1,
        "rope": layers,
        "cross_entropy": 1,
    }
    assert report.counts() == want, report.summary()
    inside = [m for m in report.matches if m.pattern == "lora"]
    assert all("layers." in m.module for m in inside)
    if base == "nf4":
        assert all("bitsandbytes 4-bit nf4" in m.variant for m in inside)


def test_plain_gradient_checkpointing_enable_still_matches():
    """model.gradient_checkpointing_enable() as users write it (input-grad hook, use_cache on): the
    hook splits the graph, the layers are still rewritten; prepare_gradient_checkpointing makes it one."""
    model = peft_llama(layers=LAYERS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inputs = batch(model, seed=0)
    be = foak_compile.backend(inner="aot_eager")
    compiled = torch.compile(model, backend=be)
    loss_and_grads(model, inputs, call=compiled)
    assert len(be.reports) > 1 and foak_compile.total_counts(be.reports) == FULL
    assert prepare_gradient_checkpointing(model)
    torch._dynamo.reset()
    be = foak_compile.backend(inner="aot_eager")
    loss_and_grads(model, inputs, call=torch.compile(model, backend=be))
    assert len(be.reports) == 1 and be.reports[0].counts() == FULL


# --- the QLoRA example ------------------------------------------------------------------------------


def test_qlora_example_tiny(tmp_path):
    pytest.importorskip("bitsandbytes")
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "qlora_finetune.py")
    spec = importlib.util.spec_from_file_location("qlora_finetune", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(
        [
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--batch",
            "2",
            "--seq",
            "24",
            "--inner",
            "aot_eager",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    # NF4 base, dropout 0.05, checkpointing, loss only (the default): all rewritten, lm_head + loss as one
    expected = {k: v for k, v in FULL_DROPOUT.items() if k != "cross_entropy"}
    assert result["foak_counts"] == {**expected, "linear_cross_entropy": 1}
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "foak" / "summary.txt").exists()
