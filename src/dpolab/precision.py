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


# Elements per fused update pass: the fp32 copy of a gradient slice (4 MiB) stays in cache between
# the cast that writes it and the AdamW kernel that reads it, and the master slice the kernel has
# just written is still in cache when it is rounded into the model's weights.
STEP_SLICE = 1 << 20


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies of (bf16) model parameters.

    ``step`` runs AdamW on the fp32 masters (the moments are fp32 too) with the model's bf16
    gradients, and writes the updated masters back into the model, rounded to its dtype. Takes
    the same arguments as ``torch.optim.AdamW`` (Trainer's parameter groups included). The masters
    are saved in ``state_dict`` so ``--resume`` continues exactly.

    The update is one pass over memory, slice by slice: cast a slice of the bf16 gradient into a
    small fp32 scratch buffer, run torch's fused AdamW kernel on that slice of master and moments
    (clipping folded in as its gradient scale), round the fresh master slice into the model's
    weight. No full-size fp32 gradient exists (4 bytes per weight less memory), and each
    full-size tensor is read once, the bf16 gradients twice with clipping.
    :meth:`clip_master_grads` takes the norm on the bf16 gradients in one foreach call
    (``clip_grad_norm_`` has no foreach path on CPU: a norm and a multiply per tensor).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        groups = list(params)
        if groups and isinstance(groups[0], torch.Tensor):
            groups = [{"params": groups}]
        if kwargs.get("amsgrad") or any(group.get("amsgrad") for group in groups):
            raise ValueError("bf16 weights with an fp32 master copy do not support amsgrad")
        self.model_params: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            model_params = list(group["params"])
            masters = [p.detach().float().clone() for p in model_params]
            self.model_params += model_params
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)
        self._grad_scale: torch.Tensor | None = None  # 1 / clip coefficient, set by clip_master_grads
        self._scratch = torch.empty(0)  # (STEP_SLICE,) fp32 gradient slice, kept across steps

    def masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def clip_master_grads(self, max_norm: float) -> torch.Tensor:
        """Make this step's update use gradients scaled to a total L2 norm of at most ``max_norm``
        and return the norm before clipping, as ``clip_grad_norm_`` would. The gradients are left
        as they are: :meth:`step` applies the scale as it reads them. Trainer calls it in place of
        ``clip_grad_norm_`` (``DpolabTrainer._clip_grad_norm``).

        Each tensor's norm is accumulated in fp32 and rounded to bf16 (within 0.4%); asking for an
        fp32 result instead casts every gradient first, 2.4x the time on GPT-2 124M."""
        grads = [p.grad for p in self.model_params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())  # ()
        self._grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # divides the gradients
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = iter(self.model_params)
        for group in self.param_groups:
            for master in group["params"]:
                param = next(params)
                if param.grad is not None:
                    self._update(group, master, param)
        self._grad_scale = None
        return loss

    def _update(self, group: dict[str, Any], master: torch.Tensor, param: torch.Tensor) -> None:
        """AdamW on one master from ``param.grad``, slice by slice, and the result into ``param``."""
        state = self.state[master]
        if not state:  # as torch.optim.AdamW initialises a fused parameter's state
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(master)
            state["exp_avg_sq"] = torch.zeros_like(master)
        state["step"] += 1  # the fused kernel reads the step count; it does not advance it
        slice_size = min(master.numel(), STEP_SLICE)
        if self._scratch.numel() < slice_size:
            self._scratch = torch.empty(slice_size, dtype=torch.float32)
        flat = [t.view(-1) for t in (master, state["exp_avg"], state["exp_avg_sq"], param)]
        grad = param.grad.reshape(-1)
        for start in range(0, grad.numel(), STEP_SLICE):
            end = min(start + STEP_SLICE, grad.numel())
            grad_slice = self._scratch[: end - start]
            grad_slice.copy_(grad[start:end])  # bf16 -> fp32, into cache
            master_slice, exp_avg, exp_avg_sq, param_slice = (t[start:end] for t in flat)
            torch._fused_adamw_(
                [master_slice], [grad_slice], [exp_avg], [exp_avg_sq], [], [state["step"]],
                lr=float(group["lr"]), beta1=group["betas"][0], beta2=group["betas"][1],
                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                maximize=group["maximize"], grad_scale=self._grad_scale, found_inf=None)
            param_slice.copy_(master_slice)  # fp32 -> the model's dtype

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_scale = None
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
