"""bf16 training on CPU: bf16 weights for the matmuls, an fp32 master copy for the updates.

Under CPU autocast (Trainer's ``bf16=True``) the weights stay fp32 and every linear layer casts
its weight to bf16 on each forward, then the backward produces bf16 weight gradients that are
cast up again into fp32 ``.grad``: a full read-convert-write of the model per step, twice, on a
machine whose training step is already memory-bound outside the matmuls. Here the model itself is
bf16 (no casts; half the bytes for weights, gradients and activations) and
:class:`MasterWeightAdamW` keeps the fp32 copy the optimizer needs: a learning rate of 5e-5 times
an Adam step is below bf16's resolution (8 mantissa bits) for most weights, so updating bf16
weights directly would lose most updates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def uses_bf16_weights(device: str, dtype: str) -> bool:
    """CPU bf16 trains bf16 weights with an fp32 master copy; GPUs keep Trainer's autocast."""
    return device == "cpu" and dtype == "bf16"


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies of (bf16) model parameters.

    ``step`` copies the model's gradients into the masters' fp32 gradient buffers, runs AdamW on
    the masters (the moments are fp32 too), and writes the updated masters back into the model,
    rounded to its dtype. Takes the same arguments as ``torch.optim.AdamW`` (Trainer's parameter
    groups included). The masters are saved in ``state_dict`` so ``--resume`` continues exactly.

    Each of those passes is one foreach call over every tensor (a per-tensor loop of casts costs
    a dispatch and a fresh allocation each: 14% of an AMX bf16 step went to ``copy_``), and the
    gradient buffers live across steps (a new 4-bytes-per-weight buffer every step means fresh
    pages to fault in). :meth:`clip_master_grads` clips on those fp32 buffers in one foreach norm
    and one foreach scale (torch's ``clip_grad_norm_`` has no foreach path on CPU: a norm and a
    multiply per tensor).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        groups = list(params)
        if groups and isinstance(groups[0], torch.Tensor):
            groups = [{"params": groups}]
        self.model_params: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            model_params = list(group["params"])
            masters = [p.detach().float().clone().requires_grad_(True) for p in model_params]
            self.model_params += model_params
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)
        self._grads_loaded = False  # the masters hold this step's gradients (clip_master_grads ran)

    def masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def _load_grads(self) -> None:
        """The model's gradients, cast to fp32 into the masters' buffers in one foreach copy."""
        if self._grads_loaded:
            return
        masters, grads = [], []
        for param, master in zip(self.model_params, self.masters(), strict=True):
            if param.grad is None:
                master.grad = None  # AdamW skips it, as it would the model parameter
                continue
            if master.grad is None:
                master.grad = torch.empty_like(master)
            masters.append(master.grad)
            grads.append(param.grad)
        if grads:
            torch._foreach_copy_(masters, grads)
        self._grads_loaded = True

    @torch.no_grad()
    def clip_master_grads(self, max_norm: float) -> torch.Tensor:
        """Scale this step's gradients to a total L2 norm of at most ``max_norm`` (in fp32, on the
        masters) and return the norm before clipping: ``clip_grad_norm_`` in two foreach calls.
        Trainer calls it in place of ``clip_grad_norm_`` (``DpolabTrainer._clip_grad_norm``)."""
        self._load_grads()
        grads = [m.grad for m in self.masters() if m.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # ()
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        self._load_grads()
        loss = super().step(closure)
        torch._foreach_copy_(self.model_params, self.masters())  # fp32 -> the model's dtype, one pass
        self._grads_loaded = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The masters' fp32 gradient buffers stay allocated for the next step (overwritten by it).
        self._grads_loaded = False
        for param in self.model_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fp32_masters"] = [m.detach().clone() for m in self.masters()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("fp32_masters", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            with torch.no_grad():
                for master, saved, param in zip(self.masters(), masters, self.model_params, strict=True):
                    master.copy_(saved)
                    param.copy_(saved)


def master_weight_optimizer(trainer_class: type, args: Any, model: torch.nn.Module) -> tuple[type, dict[str, Any]]:
    """``Trainer(optimizer_cls_and_kwargs=...)`` for bf16 weights: Trainer's own AdamW settings
    (learning rate, betas, eps, fused) with the fp32 master copy."""
    optimizer_cls, kwargs = trainer_class.get_optimizer_cls_and_kwargs(args, model)
    if not issubclass(optimizer_cls, torch.optim.AdamW):
        raise ValueError(f"bf16 weights need AdamW (optim adamw_torch*), got {optimizer_cls.__name__}")
    return MasterWeightAdamW, kwargs
