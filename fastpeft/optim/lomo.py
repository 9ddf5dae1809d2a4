"""LoMo and AdaLomo (Lv et al. 2023, arXiv 2306.09782 and 2310.10195): the optimizer step fused into the backward.

Each trainable parameter's update is applied by a `register_post_accumulate_grad_hook` the moment its
gradient has been accumulated, and the gradient is freed right after, so at most one parameter's
gradient is alive at any time (SGD or AdamW hold all of them until `step()`).

Gradient-norm clipping needs the global norm before the first update, so, as in the paper, it takes two
backward passes over the same graph: `grad_norm(loss)` (the norm pass: per-parameter norms, gradients
freed, nothing updated, graph retained) and then `fused_backward(loss, lr)` (the update pass).  Loss
scaling: a static `loss_scale` divides each gradient back before use; `loss_scale="dynamic"` (fp16)
checks the norm pass for inf/NaN, skips the update pass of an overflowing step and halves the scale, and
doubles it after `scale_window` clean steps.

    opt = LoMo(model, lr=1e-3, clip_grad_norm=1.0)
    loss = model(**batch).loss
    opt.grad_norm(loss)          # only when clipping or dynamic loss scaling
    opt.fused_backward(loss, lr) # the parameters are updated; no .grad is left behind

Update rules (g = unscaled, clipped gradient, fp32 math, parameters written back in their dtype):
  LoMo:    p <- p·(1 - lr·wd) - lr·g
  AdaLomo: Adafactor's factored second moment without first moment, β2_t = 1 - t^decay_rate,
           u = g/√v̂, u /= max(1, rms(u)/clip_threshold), p <- p·(1 - lr'·wd) - lr'·u,
           lr' = lr·max(eps2, rms(p))
"""

from __future__ import annotations

import math

import torch


def _named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


class _FusedBackwardOptimizer(torch.optim.Optimizer):
    """Shared machinery: hooks, the norm pass, clipping and loss scaling.  Subclasses define `_update`."""

    def __init__(self, model: torch.nn.Module, lr: float, clip_grad_norm: float | None,
                 clip_grad_value: float | None, weight_decay: float, loss_scale: float | str | None,
                 scale_window: int, defaults: dict):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{type(self).__name__} takes the model (an nn.Module) whose parameters it updates "
                            f"during the backward, got {type(model).__name__}")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        if clip_grad_value is not None and clip_grad_value <= 0:
            raise ValueError(f"clip_grad_value must be positive or None, got {clip_grad_value}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not (loss_scale is None or loss_scale == "dynamic"
                or (isinstance(loss_scale, (int, float)) and loss_scale > 0)):
            raise ValueError(f"loss_scale must be None, a positive number or 'dynamic', got {loss_scale!r}")
        self.model = model
        self.lr = float(lr)
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.weight_decay = float(weight_decay)
        self.dynamic_scale = loss_scale == "dynamic"
        self.loss_scale = 2.0 ** 16 if self.dynamic_scale else (float(loss_scale) if loss_scale else None)
        self.scale_window = int(scale_window)
        self._clean_steps = 0
        self.step_num = 0
        self.clip_coef: torch.Tensor | None = None
        self.skipped_steps = 0
        self._overflow: bool | None = None
        self._mode = "idle"  # "norm" (norm pass), "update" (update pass), "skip" (overflowed step), "idle"
        self._norms: list[torch.Tensor] = []
        self._norm_ready = False
        self._named = _named_trainable(model)
        if not self._named:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameters")
        self._names = {id(p): n for n, p in self._named}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for _, p in self._named]
        super().__init__([p for _, p in self._named], dict(lr=lr, weight_decay=weight_decay, **defaults))

    # -- the hook: runs once per parameter per backward, right after its .grad is complete -----------
    def _hook(self, p: torch.Tensor) -> None:
        mode = self._mode
        if mode == "idle":
            mode = self._begin_implicit()
        with torch.no_grad():
            g = p.grad
            p.grad = None  # freed before the next parameter's gradient is produced
            if mode == "skip":
                return
            if mode == "implicit":
                mode = "update"
            g = g.float()  # a copy for low-precision grads, the same storage for fp32 (freed on return)
            if self.loss_scale is not None:
                g = g / self.loss_scale
            if mode == "norm":
                self._norms.append(torch.linalg.vector_norm(g))
                return
            if self.clip_grad_value is not None:
                g.clamp_(-self.clip_grad_value, self.clip_grad_value)
            if self.clip_coef is not None:
                g.mul_(self.clip_coef)
            self._update(p, g)

    def _begin_implicit(self) -> str:
        """A plain `loss.backward()` (a training loop or transformers' Trainer given this optimizer):
        the update pass at the param groups' lr, with no loss scaling and no norm clipping, which
        need the two-pass API.  The step counter advances once per backward (engine callback)."""
        if self.clip_grad_norm is not None or self.loss_scale is not None:
            raise RuntimeError(f"{type(self).__name__}: a plain loss.backward() ran but clip_grad_norm="
                               f"{self.clip_grad_norm} / loss_scale={self.loss_scale} need the norm pass: call "
                               "opt.grad_norm(loss) then opt.fused_backward(loss, lr) instead")
        self._mode = "implicit"
        self.step_num += 1

        def done() -> None:
            self._mode = "idle"

        torch.autograd.Variable._execution_engine.queue_callback(done)
        return "update"

    def _update(self, p: torch.Tensor, g: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"{type(self).__name__} needs a scalar loss tensor, got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        if self.loss_scale is not None:
            loss = loss * self.loss_scale
        loss.backward(retain_graph=retain_graph)

    # -- public API ---------------------------------------------------------------------------------
    def grad_norm(self, loss: torch.Tensor) -> torch.Tensor:
        """The norm pass: a backward that only measures the global gradient norm (graph retained).
        Sets the clipping coefficient for the following `fused_backward`; returns the unscaled norm."""
        self._norms = []
        self._mode = "norm"
        try:
            self._backward(loss, retain_graph=True)
        finally:
            self._mode = "idle"
        total = torch.linalg.vector_norm(torch.stack(self._norms)) if self._norms else torch.zeros(())
        self._norms = []
        self._overflow = None
        if self.dynamic_scale:  # one host sync per step, only with dynamic loss scaling
            self._overflow = not bool(torch.isfinite(total))
        if self.clip_grad_norm is not None:
            self.clip_coef = torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)
        self._norm_ready = True
        return total

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        """The update pass: backward with each parameter updated (and its gradient freed) in its hook."""
        needs_norm = self.clip_grad_norm is not None or self.dynamic_scale
        if needs_norm and not self._norm_ready:
            raise ValueError(f"{type(self).__name__}: clip_grad_norm={self.clip_grad_norm} / "
                             f"loss_scale={'dynamic' if self.dynamic_scale else self.loss_scale} needs the norm "
                             "pass first: call opt.grad_norm(loss) before opt.fused_backward(loss, lr)")
        if lr is not None:
            if lr < 0:
                raise ValueError(f"lr must be >= 0, got {lr}")
            self.lr = float(lr)
            for group in self.param_groups:
                group["lr"] = self.lr
        overflow = bool(self._overflow)
        self._mode = "skip" if overflow else "update"
        if not overflow:
            self.step_num += 1
        try:
            self._backward(loss, retain_graph=False)
        finally:
            self._mode = "idle"
            self._norm_ready = False
            self._overflow = None
            if not needs_norm:
                self.clip_coef = None
        if self.dynamic_scale:
            if overflow:
                self.skipped_steps += 1
                self.loss_scale = max(self.loss_scale / 2.0, 1.0)
                self._clean_steps = 0
            else:
                self._clean_steps += 1
                if self._clean_steps >= self.scale_window:
                    self.loss_scale *= 2.0
                    self._clean_steps = 0

    def step(self, closure=None):  # noqa: D401 - torch.optim interface
        """No-op: the update happened in `fused_backward`.  Present so training loops that call
        `optimizer.step()` (and LR schedulers) keep working."""
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure: the update is fused into "
                             "fused_backward(loss, lr)")
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self._named:
            p.grad = None

    def state_dict(self) -> dict:
        """torch.optim's state dict plus the step counter and the loss-scaling state (a resumed AdaLomo
        continues its β2 schedule, a resumed dynamic scale its value): plain numbers."""
        out = super().state_dict()
        out["fused_backward"] = {"step_num": self.step_num, "loss_scale": self.loss_scale,
                                 "clean_steps": self._clean_steps, "skipped_steps": self.skipped_steps}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("fused_backward", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.step_num = int(extra["step_num"])
            self.loss_scale = None if extra["loss_scale"] is None else float(extra["loss_scale"])
            self._clean_steps = int(extra["clean_steps"])
            self.skipped_steps = int(extra["skipped_steps"])
        self.lr = float(self.param_groups[0]["lr"])

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (plain loss.backward() works again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def attach(self) -> None:
        """Hook the parameters again after `remove_hooks` (a no-op while attached)."""
        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._hook) for _, p in self._named]


class LoMo(_FusedBackwardOptimizer):
    """LOw-Memory Optimization: SGD applied inside the backward, one parameter at a time."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, weight_decay: float = 0.0,
                 loss_scale: float | str | None = None, scale_window: int = 1000):
        super().__init__(model, lr, clip_grad_norm, clip_grad_value, weight_decay, loss_scale, scale_window, {})

    def _update(self, p: torch.Tensor, g: torch.Tensor) -> None:
        lr = self.param_groups[0]["lr"]
        if p.dtype == torch.float32:
            if self.weight_decay:
                p.mul_(1.0 - lr * self.weight_decay)
            p.add_(g, alpha=-lr)
            return
        p32 = p.float()
        if self.weight_decay:
            p32.mul_(1.0 - lr * self.weight_decay)
        p32.add_(g, alpha=-lr)
        p.copy_(p32)


class AdaLomo(_FusedBackwardOptimizer):
    """AdaLomo: LoMo with Adafactor-style factored second moments (no first moment) and
    parameter-RMS-relative step sizes.  State: a row and a column vector per matrix, a vector per
    vector parameter (fp32)."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, weight_decay: float = 0.0,
                 loss_scale: float | str | None = None, scale_window: int = 1000):
        if len(eps) != 2:
            raise ValueError(f"eps must be a pair (eps1 for the second moment, eps2 for the step size), got {eps}")
        if clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be positive, got {clip_threshold}")
        self.eps = (float(eps[0]), float(eps[1]))
        self.clip_threshold = float(clip_threshold)
        self.decay_rate = float(decay_rate)
        super().__init__(model, lr, clip_grad_norm, clip_grad_value, weight_decay, loss_scale, scale_window,
                         dict(eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate))
        for _, p in self._named:
            st = self.state[p]
            if p.dim() >= 2:
                st["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                st["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32,
                                                   device=p.device)
            else:
                st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _update(self, p: torch.Tensor, g: torch.Tensor) -> None:
        st = self.state[p]
        # the paper's β2_t = 1 - t^decay_rate (t counts from 1, so the first step takes the raw g²)
        beta2t = 1.0 - math.pow(self.step_num, self.decay_rate)
        sq = g.square().add_(self.eps[0])
        if p.dim() >= 2:
            row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
            del sq
            r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c = col.unsqueeze(-2).rsqrt()
            u = (r * c).mul_(g)
        else:
            v = st["exp_avg_sq"]
            v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            u = v.rsqrt().mul_(g)
        u.div_((_rms(u) / self.clip_threshold).clamp_(min=1.0))
        p32 = p.float()  # p itself when fp32
        # lr' = lr·max(eps2, rms(p)) kept on the device: no host sync per parameter
        lr = _rms(p32).clamp_(min=self.eps[1]).mul_(self.param_groups[0]["lr"])
        if self.weight_decay:
            p32.mul_(1.0 - lr * self.weight_decay)
        p32.sub_(u.mul_(lr))
        if p32 is not p:
            p.copy_(p32)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t) / math.sqrt(t.numel())


class GradientPeak:
    """The largest total of `.grad` bytes alive at once over `model`'s trainable parameters, seen from a
    post-accumulate hook on each (register it before an optimizer's own hooks so that every gradient is seen
    before that optimizer frees it): `peak` after a backward.  What LoMo promises to keep at one parameter's
    gradient, where SGD or AdamW hold all of them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.peak = 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, _param: torch.Tensor) -> None:
        alive = sum(q.grad.numel() * q.grad.element_size() for q in self.params if q.grad is not None)
        self.peak = max(self.peak, alive)
