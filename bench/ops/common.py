"""What an op spec gives the runner, and helpers the specs share.

A spec module (bench/ops/<op>.py) defines:
    OP                      the op's name
    cases(quick)            list[Case]: shapes, dtype, and the bytes fwd and fwd+bwd must move (the floor)
    make_inputs(case, dev)  dict of fresh random tensors (seeded, so every provider gets the same values)
    reference(case, inp)    the forward outputs of swiftlora's plain-PyTorch reference (for the error check)
    PROVIDERS               {"swiftlora" | "torch" | "liger" | "unsloth": (case, inputs) -> Bench}
A provider function raises ``Unavailable`` (or anything else) when it cannot run; the runner records a row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..harness import Restore

SEED = 0


class Unavailable(Exception):
    """A provider that cannot run here: not installed, op not built yet, or needs another device."""


@dataclass(frozen=True)
class Case:
    name: str  # variant within the op ("" or e.g. "tanh")
    shape: str  # for the table, e.g. "x[16384,4096]"
    dtype: torch.dtype
    dims: dict
    bytes_fwd: int  # the floor: bytes a forward must read + write
    bytes_fwd_bwd: int  # forward + backward (grads of every input)
    flops_fwd: int = 0  # the matmul FLOPs a forward must do (the fused LM-head ops; 0 = a memory-bound op)
    flops_fwd_bwd: int = 0


@dataclass
class Bench:
    """Callables for one provider on one case. ``output`` runs the forward on the still-pristine inputs and returns
    its outputs in the reference's layout; ``restore`` puts back inputs an in-place provider overwrites."""

    fwd: Callable[[], object]
    fwd_bwd: Callable[[], object]
    output: Callable[[], Sequence[torch.Tensor]]
    restore: Restore | None = None
    notes: list[str] = field(default_factory=list)


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def autograd_bench(
    fn: Callable[[], object],
    inputs: Sequence[torch.Tensor],
    grad_like: Sequence[torch.Tensor],
    canonical: Callable[[tuple], Sequence[torch.Tensor]] = lambda outs: outs,
    restore: Restore | None = None,
    notes: Sequence[str] = (),
) -> Bench:
    """A provider that is a differentiable function of ``inputs``: the forward records the graph (a training
    forward); fwd+bwd takes the gradients of every input for fixed random output gradients shaped (and strided)
    like ``grad_like``. ``torch.autograd.grad`` returns them instead of accumulating into ``.grad``, so no extra
    accumulate kernel runs."""
    grads = [torch.randn_like(t) for t in grad_like]

    def fwd_bwd():
        return torch.autograd.grad(as_tuple(fn()), inputs, grads)

    def output():
        with torch.no_grad():
            return canonical(as_tuple(fn()))

    return Bench(fwd=fn, fwd_bwd=fwd_bwd, output=output, restore=restore, notes=list(notes))


def loss_bench(
    fn: Callable[[], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad: torch.Tensor | Sequence[torch.Tensor] | None = None,
    restore: Restore | None = None,
    notes: Sequence[str] = (),
) -> Bench:
    """A provider whose output is a loss (or per-token values, or a tuple of them): fwd+bwd takes the gradients of
    ``inputs`` for the upstream gradient(s) ``grad``, by default 1 for a scalar loss, as ``loss.backward()`` in
    training (providers that form the gradient in the forward then skip their scaling pass, as they would there)."""
    wrt = [t for t in inputs if t.requires_grad]

    def fwd_bwd():
        outs = as_tuple(fn())
        grads = [torch.ones((), device=o.device) for o in outs] if grad is None else as_tuple(grad)
        return torch.autograd.grad(outs, wrt, grads)

    def output():
        with torch.no_grad():
            return as_tuple(fn())

    return Bench(fwd=fn, fwd_bwd=fwd_bwd, output=output, restore=restore, notes=list(notes))


def _with_blocks_flag(bench: Bench, name: str, value: bool, note: str) -> Bench:
    """The same provider with the module switch lm_head_blocks.<name> set to value while it runs."""
    import swiftlora.ops.lm_head_blocks as blocks

    def switched(fn):
        def run():
            before = getattr(blocks, name)
            setattr(blocks, name, value)
            try:
                return fn()
            finally:
                setattr(blocks, name, before)
        return run

    return Bench(fwd=switched(bench.fwd), fwd_bwd=switched(bench.fwd_bwd), output=switched(bench.output),
                 restore=bench.restore, notes=bench.notes + [note])


def two_streams(bench: Bench) -> Bench:
    """The same provider with each vocabulary block's softmax on a side stream beside the next block's GEMM
    (lm_head_blocks.OVERLAP on; the default is one stream), compared in the same run."""
    return _with_blocks_flag(bench, "OVERLAP", True, "softmax on a side stream beside the next GEMM")


def python_loop(bench: Bench) -> Bench:
    """The same provider with the vocabulary-block loop issued from Python (lm_head_blocks.NATIVE off; the default
    is the C++ op lm_head_blocks_), compared in the same run: what the host's launch rate costs."""
    return _with_blocks_flag(bench, "NATIVE", False, "vocabulary-block loop in Python (head_chunks_reference)")


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def require_cuda(inputs: dict, who: str) -> None:
    dev = next(t.device for t in inputs.values() if isinstance(t, torch.Tensor))
    if dev.type != "cuda":
        raise Unavailable(f"{who} runs Triton kernels, which need a CUDA device")


def import_swiftlora_ops(*names: str) -> list:
    """swiftlora.ops.<name> for each name; ops still being written raise Unavailable instead of ImportError."""
    try:
        import swiftlora.ops as ops
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import swiftlora: {type(exc).__name__}: {exc}") from exc
    missing = [n for n in names if not hasattr(ops, n)]
    if missing:
        raise Unavailable(f"swiftlora.ops has no {', '.join(missing)} in this build")
    return [getattr(ops, n) for n in names]


def import_unsloth():
    """Imports unsloth first, as it requires (it patches other libraries on import); its kernels afterwards."""
    try:
        import unsloth  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import unsloth: {type(exc).__name__}: {exc}") from exc


def rel_err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """max over outputs of ‖out − ref‖ / ‖ref‖, in float64."""
    errs = []
    for out, ref in zip(outs, refs, strict=True):
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
        o, r = out.detach().double(), ref.detach().double()
        denom = r.norm().item()
        errs.append((o - r).norm().item() / (denom if denom > 0 else 1.0))
    return max(errs)
