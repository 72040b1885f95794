"""The non-finite guard of a training run (:class:`FiniteGuard`): steps whose loss or gradients are not finite
are skipped, and a rare step that still makes a weight non-finite goes back to a restore point."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor, nn


class _Snapshot:
    """Copies of a model's parameters and buffers and of an optimizer's state, storage reused between
    captures."""

    def __init__(self) -> None:
        self.tensors: List[Tensor] = []
        self.optim: Dict[int, Dict[str, Any]] = {}

    @torch.no_grad()
    def capture(self, live: List[Tensor], optimizer: torch.optim.Optimizer) -> None:
        if len(self.tensors) != len(live):
            self.tensors = [t.detach().clone() for t in live]
        else:
            torch._foreach_copy_(self.tensors, [t.detach() for t in live])
        saved: Dict[int, Dict[str, Any]] = {}
        for param, state in optimizer.state.items():
            old = self.optim.get(id(param), {})
            entry = {}
            for key, value in state.items():
                if isinstance(value, Tensor):
                    copy = old.get(key)
                    if isinstance(copy, Tensor) and copy.shape == value.shape and copy.dtype == value.dtype:
                        copy.copy_(value)
                    else:
                        copy = value.detach().clone()
                    entry[key] = copy
                else:
                    entry[key] = value
            saved[id(param)] = entry
        self.optim = saved

    @torch.no_grad()
    def apply(self, live: List[Tensor], optimizer: torch.optim.Optimizer) -> None:
        torch._foreach_copy_([t.detach() for t in live], self.tensors)
        for group in optimizer.param_groups:
            for param in group["params"]:
                saved = self.optim.get(id(param))
                if saved is None:
                    optimizer.state.pop(param, None)
                    continue
                state = optimizer.state[param]
                for key, value in saved.items():
                    if isinstance(value, Tensor) and isinstance(state.get(key), Tensor):
                        state[key].copy_(value)
                    else:
                        state[key] = value.clone() if isinstance(value, Tensor) else value


class FiniteGuard:
    """Keeps non-finite numbers out of the weights, the optimizer state and the BatchNorm statistics, at the cost
    of one finiteness check of the gradients and one of the weights per step (no copy of the weights or of the
    optimizer state per step).

    Per step:

    1. :meth:`begin` before the forward copies the model's buffers (BatchNorm statistics move in every training
       forward, even when the loss comes out NaN; they are small).
    2. :meth:`step_is_finite` after the backward, before the optimizer step: one fused check of the loss and
       every gradient. When it is False the step is skipped: :meth:`skip` puts the buffers back, and as the
       optimizer has not stepped, the weights and its state are untouched.
    3. After the optimizer step, :meth:`is_finite` checks every parameter and buffer. False (rare: finite
       gradients that still overflow a weight) calls for :meth:`restore`, which goes back to the restore point;
       True for :meth:`accept`.

    The restore point (parameters, buffers and optimizer state, one copy on the model's device) is taken at
    construction, after every ``snapshot_every`` accepted steps and on :meth:`keep_restore_point` (e.g. when a
    checkpoint is saved); it is always a state that steps were taken from without trouble.

    Under DistributedDataParallel each rank has its own guard and its own verdict (its BatchNorm statistics come
    from its own batches): the ranks must and their verdicts (:func:`utils.training.distributed.on_all_ranks`)
    and all take the same branch, or the replicas diverge.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, snapshot_every: int = 100) -> None:
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be at least 1, got {snapshot_every}")
        self.model, self.optimizer, self.snapshot_every = model, optimizer, snapshot_every
        self._live = list(model.state_dict(keep_vars=True).values())
        self._float = [t for t in self._live if t.is_floating_point()]
        self._buffers = [b for b in model.buffers()]
        self._buffer_copies = [b.detach().clone() for b in self._buffers]
        self._params = [p for p in model.parameters()]
        self._point = _Snapshot()
        self.good_steps = 0
        self.point_good_steps = 0  # good steps done when the restore point was taken
        self.last_undone = 0       # good steps the last restore went back over
        self.keep_restore_point()

    @torch.no_grad()
    def begin(self) -> None:
        """A step starts: remember the buffers (BatchNorm statistics), which its forward moves."""
        if self._buffers:
            torch._foreach_copy_(self._buffer_copies, [b.detach() for b in self._buffers])

    @torch.no_grad()
    def step_is_finite(self, loss: Tensor) -> bool:
        """The loss and every gradient are finite (one fused reduction; call before the optimizer step, after
        unscaling the gradients of a mixed-precision step)."""
        grads = [p.grad.detach() for p in self._params if p.grad is not None]
        values = [loss.detach().float().reshape(1)]
        if grads:
            values.append(torch.stack(torch._foreach_norm(grads)).float())
        return bool(torch.isfinite(torch.cat(values)).all())

    @torch.no_grad()
    def skip(self) -> None:
        """The step begun last is not taken: the buffers go back to their values at :meth:`begin`."""
        if self._buffers:
            torch._foreach_copy_([b.detach() for b in self._buffers], self._buffer_copies)

    @torch.no_grad()
    def is_finite(self) -> bool:
        """Every floating parameter and buffer of the model is finite (one fused reduction)."""
        norms = torch._foreach_norm([t.detach() for t in self._float])
        return bool(torch.isfinite(torch.stack(norms)).all())

    def accept(self) -> None:
        """The step went well; every ``snapshot_every`` good steps the state after it becomes the restore point."""
        self.good_steps += 1
        if self.good_steps % self.snapshot_every == 0:
            self.keep_restore_point()

    def keep_restore_point(self) -> None:
        """The model and optimizer as they are now become the state :meth:`restore` returns to."""
        self._point.capture(self._live, self.optimizer)
        self.point_good_steps = self.good_steps

    def restore(self) -> None:
        """Put back the restore point: parameters, buffers and optimizer state (``last_undone``: how many good
        steps that went back over)."""
        self._point.apply(self._live, self.optimizer)
        self.last_undone = self.good_steps - self.point_good_steps
        self.good_steps = self.point_good_steps
