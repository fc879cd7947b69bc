"""Using the foak backend with Hugging Face Trainer, TRL's SFTTrainer, accelerate, gradient
checkpointing, DDP and FSDP2.

    from foak_compile.integrations import compile_for_trainer, FoakCallback
    model = compile_for_trainer(model)                      # model.compile(backend=foak), in place
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[FoakCallback()])
    trainer.train()                                         # reports: FoakCallback.reports, output_dir/foak/

Why in place: `TrainingArguments(torch_compile_backend="foak")` is refused by accelerate, which checks the
name against its fixed list (`ValueError: 'FOAK' is not a valid DynamoBackend`), and a
`torch.compile(model)` wrapper handed to Trainer hides the model's forward signature from Trainer's
column filter (`ValueError: No columns in the dataset match the model's forward method signature`).
`nn.Module.compile` keeps the model object, so Trainer, peft, accelerate's wrapping and saving see the
model they expect while every call goes through the compiled graph.
"""

import inspect
import logging
import os
import types
from collections.abc import Callable
from typing import Any, Optional

import torch

from .backend import FoakBackend, backend as make_backend
from .report import reports as all_reports
from .report import total_counts

log = logging.getLogger("foak_compile")

__all__ = [
    "compile_for_trainer",
    "enable_gradient_checkpointing",
    "prepare_gradient_checkpointing",  # noqa: F822
    "FoakCallback",  # noqa: F822  (module __getattr__: transformers loads on first use)
]


def compile_for_trainer(
    model: torch.nn.Module,
    backend: Optional[FoakBackend] = None,
    dynamic: Optional[bool] = None,
    loss_only: bool = False,
    **backend_kw: Any,
) -> torch.nn.Module:
    """Compile `model` in place with the foak backend and return it, ready for Trainer / SFTTrainer.

    `backend`: a configured `foak_compile.backend(...)`; otherwise one is built from `backend_kw`
    (`patterns=`, `inner=`, `dump_dir=`). Leave `TrainingArguments.torch_compile` off: the model is
    already compiled.

    `loss_only=True`: in training mode, a forward that computes a loss returns it without the logits
    (`outputs.logits` is None), so the compiled graph does not output them and lm_head + loss fuse into
    linear_cross_entropy: no [tokens, vocab] logits at all. Trainer's training step reads only the
    loss; in eval mode (evaluation, prediction) the logits are returned as usual. Not for code that
    reads the logits while training (TRL's SFTTrainer token accuracy, distillation losses).
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "compile_for_trainer takes the model itself, not a torch.compile wrapper: pass "
            "`wrapper._orig_mod` (Trainer cannot read a wrapper's forward signature)"
        )
    be = backend if backend is not None else make_backend(**backend_kw)
    if loss_only and not getattr(model.forward, "_foak_loss_only", False):
        model.forward = _loss_only(model, model.forward)
    model.compile(backend=be, dynamic=dynamic)
    return model


def _loss_only(model: torch.nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` as a method of `model` that leaves the logits out of a training-mode output carrying
    a loss. Bound, not a closure over `model`: a deep copy (TRL's reference model, an EMA copy) gets
    its own (copy.deepcopy rebinds methods)."""

    def loss_only_forward(self, *args, **kwargs):
        out = self._foak_full_forward(*args, **kwargs)
        if self.training and getattr(out, "loss", None) is not None and getattr(out, "logits", None) is not None:
            return type(out)(**{k: v for k, v in out.items() if k != "logits"})
        return out

    sig = inspect.signature(forward)  # Trainer reads it to pick dataset columns
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    loss_only_forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    loss_only_forward.__doc__ = getattr(forward, "__doc__", None)
    loss_only_forward._foak_loss_only = True
    model._foak_full_forward = forward
    return types.MethodType(loss_only_forward, model)


def _models(model: Optional[torch.nn.Module]) -> list[torch.nn.Module]:
    """`model` and what it wraps (peft, DDP, compile wrappers), outermost first."""
    seen = []
    while model is not None and all(model is not m for m in seen):
        seen.append(model)
        nxt = None
        for attr in ("_orig_mod", "module", "base_model", "model"):
            cand = getattr(model, attr, None)
            if isinstance(cand, torch.nn.Module):
                nxt = cand
                break
        model = nxt
    return seen


def prepare_gradient_checkpointing(model: torch.nn.Module) -> bool:
    """Make a model whose gradient checkpointing is already on compile as one graph; True if it was on.

    Checkpointed layers compile either way: Dynamo records each as a `tag_activation_checkpoint` region
    and foak rewrites inside it. What splits the graph are two things around them. transformers (and
    peft, and TRL) hook the input embeddings with `output.requires_grad_(True)`, which Dynamo cannot
    trace ("requires_grad_() intermediate leaked as output"; inside peft's forward-hook context the
    whole PeftModel.forward then runs outside the graph and only the frames below it are compiled), and
    `use_cache=True` makes transformers log a warning inside the forward (another graph break).
    Non-reentrant checkpointing does not need the hook, so it is removed; reentrant checkpointing
    needs it wherever a layer runs eagerly, so it stays (the model still compiles, in three graphs).
    """
    on, reentrant = False, False
    for m in _models(model):
        for sub in m.modules():
            if getattr(sub, "gradient_checkpointing", False) is True:
                on = True
                kw = getattr(getattr(sub, "_gradient_checkpointing_func", None), "keywords", None)
                # torch's checkpoint is reentrant when use_reentrant is not given
                reentrant |= kw is None or kw.get("use_reentrant", True)
    if not on:
        return False
    for m in _models(model):
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", False):
            cfg.use_cache = False
        if not reentrant:
            _remove_input_grad_hooks(m)
    return True


# transformers' enable_input_require_grads and peft's fallback name their hooks so
_INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


def _remove_input_grad_hooks(m: torch.nn.Module) -> None:
    if getattr(m, "_require_grads_hooks", None):
        m.disable_input_require_grads()
    get = getattr(m, "get_input_embeddings", None)
    try:
        emb = get() if get is not None else None
    except (NotImplementedError, AttributeError):
        emb = None
    if isinstance(emb, torch.nn.Module):
        # a second enable_input_require_grads (TRL calls it, then Trainer again) overwrites the handle list
        # and the earlier hook can no longer be removed through it
        for hid, fn in list(emb._forward_hooks.items()):
            if getattr(fn, "__name__", "") in _INPUT_GRAD_HOOKS:
                del emb._forward_hooks[hid]


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Non-reentrant gradient checkpointing of every layer, in the form the foak backend traces."""
    kw = {"use_reentrant": False}
    inner = next((m for m in _models(model) if hasattr(m, "activation_checkpointing_enable")), None)
    if inner is not None:  # transformers >= 5.2x; gradient_checkpointing_enable is its deprecated alias
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    prepare_gradient_checkpointing(model)
    return model


def __getattr__(name: str) -> Any:
    # FoakCallback subclasses transformers.TrainerCallback, whose import costs seconds (accelerate):
    # built on first use, so `import foak_compile` stays light
    if name == "FoakCallback":
        cls = _make_callback()
        globals()["FoakCallback"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_callback() -> type:
    from transformers import TrainerCallback

    class FoakCallback(TrainerCallback):
        """Trainer callback: makes Trainer's gradient checkpointing compile as one graph, logs the match
        counts after the first step, and on train end writes every graph report to `<output_dir>/foak/`
        (report.json, report.txt, before.py, after.py per graph, and summary.txt).

        `counts` / `reports` hold what the backend did during this training run.
        """

        def __init__(self, dump: bool = True, log_level: int = logging.INFO) -> None:
            self.dump, self.log_level = dump, log_level
            self._first = 0
            self.reports, self.counts, self.dump_dir = [], {}, None

        def on_train_begin(self, args, state, control, model=None, **kw):
            # Trainer turns checkpointing on (TrainingArguments.gradient_checkpointing, on by default in
            # TRL's SFTConfig) inside train(): after the model was compiled, before this event
            if model is not None and prepare_gradient_checkpointing(model):
                log.info("foak: gradient checkpointing prepared for compilation")
            if getattr(args, "torch_compile", False):
                log.warning(
                    "foak: TrainingArguments.torch_compile is on; compile_for_trainer already compiled "
                    "the model, leave it off"
                )
            self._first = len(all_reports())

        def _collect(self):
            self.reports = all_reports()[self._first :]
            self.counts = total_counts(self.reports)

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                self._collect()
                log.log(self.log_level, "foak: matched %s in %d graph(s)", self.counts or "nothing", len(self.reports))

        def on_train_end(self, args, state, control, **kw):
            self._collect()
            if self.dump and getattr(args, "output_dir", None) and state.is_world_process_zero:
                self.dump_dir = os.path.join(args.output_dir, "foak")
                for r in self.reports:
                    r.dump(self.dump_dir)
                os.makedirs(self.dump_dir, exist_ok=True)
                with open(os.path.join(self.dump_dir, "summary.txt"), "w") as f:
                    f.write("".join(r.summary() + "\n" for r in self.reports))
                    f.write(f"total: {self.counts}\n")

    return FoakCallback
