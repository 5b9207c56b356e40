"""Gradient checkpointing whose saved layer inputs wait in pinned host memory (``use_gradient_checkpointing=
"unsloth"``).

A checkpointed decoder layer keeps only its input ``[B, S, hidden]`` for the recompute. Here that input is copied to
a pinned CPU buffer on a side CUDA stream during the forward (the GPU copy is then freed with the rest of the
layer's transients), and in the backward it comes back to the GPU, the layer is recomputed under the forward's RNG
and autocast state and backpropagated. While layer ``i`` recomputes, layer ``i-1``'s input is already being copied
back on the side stream, so the transfers overlap compute. Inputs under 1 MiB stay on the GPU (not worth a copy).
On CPU there is nowhere cheaper to put them: the input stays where it is (plain recompute checkpointing).

The autograd Function takes a zero-size ``anchor`` tensor that requires grad, so the backward runs even when the
first layer's input does not require grad (frozen embeddings, LoRA): no ``enable_input_require_grads`` hook needed.
"""
from __future__ import annotations

import weakref
from functools import partial

import torch

from .. import _compat

MIN_OFFLOAD_BYTES = 1 << 20


class _Saved:
    """One offloaded layer input: a pinned host buffer, the event marking its copy, and (once prefetched) the
    device tensor coming back."""

    __slots__ = ("host", "event", "shape", "dtype", "device", "back", "back_event", "__weakref__")

    def __init__(self, host, event, shape, dtype, device):
        self.host, self.event, self.shape, self.dtype, self.device = host, event, shape, dtype, device
        self.back = self.back_event = None


class HostOffloader:
    """Pinned buffers (reused across steps) and the side stream for one model's checkpointed layer inputs."""

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.min_bytes = min_bytes
        self._free: list[torch.Tensor] = []            # pinned uint8 buffers ready for reuse
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # buffers whose H2D copy may still run
        self._live: list[weakref.ref] = []              # offloaded inputs in forward order
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __getstate__(self):
        # streams and pinned buffers are per-process caches: a copy (pickle, deepcopy) starts with its own
        return {"min_bytes": self.min_bytes}

    def __setstate__(self, state):
        self.__init__(state["min_bytes"])

    def _stream(self, device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _take(self, nbytes: int) -> torch.Tensor:
        still = []
        for buf, ev in self._pending:
            (self._free.append(buf) if ev.query() else still.append((buf, ev)))
        self._pending = still
        fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fits:
            # by position: list.remove would compare tensors with ==, elementwise (and fail across sizes)
            return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def offload(self, x: torch.Tensor):
        """Start copying ``x`` to host memory; returns what :meth:`restore` needs (``x`` itself when not offloaded)."""
        nbytes = x.numel() * x.element_size()
        if not x.is_cuda or nbytes < self.min_bytes:
            return x.detach()
        host = self._take(nbytes)
        src = x.detach().contiguous()  # (a copy on the current stream when x is strided)
        side, current = self._stream(x.device), torch.cuda.current_stream(x.device)
        side.wait_stream(current)  # x (and its contiguous copy) are complete
        with torch.cuda.stream(side):
            host[:nbytes].copy_(src.view(-1).view(torch.uint8), non_blocking=True)
            event = side.record_event()
        src.record_stream(side)  # the allocator must not reuse x's memory before the copy has read it
        saved = _Saved(host, event, x.shape, x.dtype, x.device)
        self._live = [r for r in self._live if r() is not None] + [weakref.ref(saved)]
        return saved

    def _fetch(self, saved: _Saved) -> None:
        """Start the copy back on the side stream (after its offload copy)."""
        side = self._stream(saved.device)
        nbytes = saved.dtype.itemsize * _numel(saved.shape)
        with torch.cuda.stream(side):
            side.wait_event(saved.event)
            back = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
            back.view(-1).view(torch.uint8).copy_(saved.host[:nbytes], non_blocking=True)
            saved.back, saved.back_event = back, side.record_event()
        self._pending.append((saved.host, saved.back_event))

    def restore(self, saved) -> torch.Tensor:
        """The device tensor again (waits for its copy on the current stream) and prefetches the previous layer's."""
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.back is None:
            self._fetch(saved)
        current = torch.cuda.current_stream(saved.device)
        current.wait_event(saved.back_event)
        back = saved.back
        back.record_stream(current)
        saved.back = None
        live = [r() for r in self._live]
        live = [s for s in live if s is not None and s is not saved]
        self._live = [weakref.ref(s) for s in live]
        if live and live[-1].back is None:
            self._fetch(live[-1])  # backward runs layers in reverse: the previous one is next
        return back


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _OffloadedCheckpoint(torch.autograd.Function):
    """inputs: (anchor, x, *rest, *params): ``params`` are the layer's trainable parameters, inputs here so that
    the autograd graph reaches them and their gradients flow out of this node like any other op's (DDP's
    unused-parameter search and its gradient hooks then see an ordinary graph; no gradient is written behind
    autograd's back)."""

    @staticmethod
    def forward(ctx, run, offloader, kwargs, n_rest, anchor, x, *rest_and_params):
        rest = rest_and_params[:n_rest]
        ctx.run, ctx.offloader, ctx.kwargs, ctx.n_rest = run, offloader, kwargs, n_rest
        ctx.rest, ctx.params = rest, rest_and_params[n_rest:]
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.x_device = x.device
        with torch.no_grad():
            out = run(x, *rest, **kwargs)
        ctx.saved = offloader.offload(x)
        ctx.is_tuple = isinstance(out, tuple)
        return out if ctx.is_tuple else (out,)

    @staticmethod
    def backward(ctx, *grads):
        x = ctx.offloader.restore(ctx.saved).detach().requires_grad_(ctx.needs_input_grad[5])
        ctx.saved = None
        rest = tuple(r.detach().requires_grad_(r.requires_grad) if isinstance(r, torch.Tensor) else r
                     for r in ctx.rest)
        devices = [ctx.x_device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device_type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.x_device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                out = ctx.run(x, *rest, **ctx.kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad
                 and g is not None]
        tensors = [x] + [r for r in rest if isinstance(r, torch.Tensor)] + list(ctx.params)
        grads_in = _input_grads(pairs, tensors, accumulate_others=not ctx.params)
        x_grad, others = grads_in[0], iter(grads_in[1:])
        rest_grads = tuple(next(others) if isinstance(r, torch.Tensor) else None for r in rest)
        return (None, None, None, None, None, x_grad if ctx.needs_input_grad[5] else None) + rest_grads + \
            tuple(others)


def _input_grads(pairs, tensors, accumulate_others: bool) -> list:
    """Gradients of the recomputed outputs w.r.t. ``tensors`` (None where one needs none). ``accumulate_others``:
    the layer's parameters are unknown, so backpropagate into every leaf (they accumulate their own ``.grad``)."""
    if not pairs:
        return [None] * len(tensors)
    outs, grads = [o for o, _ in pairs], [g for _, g in pairs]
    if accumulate_others:
        torch.autograd.backward(outs, grads)
        return [t.grad if t.requires_grad else None for t in tensors]
    need = [t for t in tensors if t.requires_grad]
    found = iter(torch.autograd.grad(outs, need, grads, allow_unused=True))
    return [next(found) if t.requires_grad else None for t in tensors]


def _trainable_parameters(function) -> tuple[torch.Tensor, ...]:
    """The trainable parameters of the layer ``function`` runs, when it is transformers' checkpointed layer call:
    ``partial(forward, layer, **kwargs)`` (transformers >= 5.2x) or ``partial(layer.__call__, **kwargs)`` (a bound
    method, earlier 5.x). Empty for any other callable: their gradients then still reach the parameters through the
    recompute, but outside the graph autograd sees, which DDP's unused-parameter search does not allow."""
    layer = None
    if isinstance(function, partial):
        layer = function.args[0] if function.args else getattr(function.func, "__self__", None)
    if not isinstance(layer, torch.nn.Module):
        return ()
    params = tuple(p for p in layer.parameters() if p.requires_grad)
    # FSDP2 shards (DTensor) here mean its hooks run inside the checkpointed call (the bound-__call__ form): the
    # recompute computes with the gathered parameters, not these, so gradients must accumulate where it puts them
    return () if any(map(_compat.is_dtensor, params)) else params


def offloaded_checkpoint(offloader: HostOffloader, function, *args, **kwargs):
    """Drop-in for ``torch.utils.checkpoint.checkpoint`` as transformers calls it for a decoder layer
    (``function(hidden_states, *rest, **kwargs)``); ``args[0]`` is the input that is offloaded. Checkpoint keyword
    arguments (``use_reentrant``, ...) are accepted and ignored."""
    for key in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"):
        kwargs.pop(key, None)
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    x, rest = args[0], args[1:]
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    params = _trainable_parameters(function)
    out = _OffloadedCheckpoint.apply(function, offloader, kwargs, len(rest), anchor, x, *rest, *params)
    return out if len(out) > 1 else out[0]


def make_offloaded_checkpoint(offloader: HostOffloader | None = None):
    """A checkpoint function bound to its own :class:`HostOffloader` (one per model)."""
    return partial(offloaded_checkpoint, offloader or HostOffloader())
