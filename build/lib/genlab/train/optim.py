"""Parameter groups, optimizers, the learning-rate schedule and EMA: the optimisation half of the engine.

Parameter groups: a recipe may pass ``[{"module": m | "params": [...], "lr_scale": 1.0,
"weight_decay": 0.01, "name": "cross_attn"}, ...]``; parameters no group names form a last group
"rest". Inside every group, norms, biases and embeddings get no weight decay (the usual rule of
GPT-2 / timm / HF trainers). ``lr_scale`` 0 freezes a group. A module passed to ``freeze`` has no
gradients and stays in eval mode through training and validation.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from genlab.train.checkpoint import persistent_buffers

# Names Muon leaves to AdamW: embeddings, heads, input/output projections, and LoRA's low-rank
# factors (orthogonalising a rank-r update is not what LoRA means).
MUON_EXCLUDE = ("embed", "head", "pos_", "input_proj", "output_proj", "lora_")


def default_muon_rule(name: str, p: nn.Parameter) -> bool:
    """Muon takes hidden 2-D weight matrices; everything else goes to AdamW."""
    return p.ndim == 2 and not any(x in name for x in MUON_EXCLUDE)


def decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay applies to weight matrices and kernels, not to norms, biases or embeddings."""
    return p.ndim >= 2 and "norm" not in name and "embed" not in name


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, and eval mode for good (``set_train_mode`` keeps it there): a frozen tower's
    dropout and norm statistics do not change while the rest trains."""
    module.requires_grad_(False)
    for m in module.modules():
        m.genlab_frozen = True
    module.eval()
    return module


def set_train_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, except that frozen modules stay in eval mode."""
    model.train(training)
    for m in model.modules():
        if getattr(m, "genlab_frozen", False):
            m.eval()


def build_param_groups(model: nn.Module, weight_decay: float, groups: list[dict] | None = None) -> list[dict]:
    """Named groups ``{"name", "params": [(name, p)], "lr_scale", "weight_decay"}`` of trainable
    parameters; every parameter belongs to exactly one (the first group naming it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    taken: set[int] = set()
    out = []
    for i, g in enumerate(groups or []):
        unknown = set(g) - {"name", "params", "module", "lr_scale", "weight_decay"}
        if unknown or ("params" in g) == ("module" in g):
            raise ValueError(f"param group {i}: give 'params' or 'module' (and optional name, lr_scale, "
                             f"weight_decay); got keys {sorted(g)}")
        params = list(g["module"].parameters()) if "module" in g else list(g["params"])
        chosen = []
        for p in params:
            if id(p) not in names:
                raise ValueError(f"param group {g.get('name', i)!r} holds a parameter that is not in the model")
            if id(p) not in taken:
                taken.add(id(p))
                chosen.append((names[id(p)], p))
        scale = float(g.get("lr_scale", 1.0))
        if scale == 0:
            for _, p in chosen:
                p.requires_grad_(False)
        out.append({"name": g.get("name", f"group{i}"), "params": chosen, "lr_scale": scale,
                    "weight_decay": float(g.get("weight_decay", weight_decay))})
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in taken]
    if rest:
        out.append({"name": "rest", "params": rest, "lr_scale": 1.0, "weight_decay": weight_decay})
    for g in out:
        g["params"] = [(n, p) for n, p in g["params"] if p.requires_grad]
    return [g for g in out if g["params"]]


def build_optimizers(groups: list[dict], cfg, muon_rule: Callable[[str, nn.Parameter], bool] | None = None
                     ) -> list[torch.optim.Optimizer]:
    """AdamW on every group, or (``cfg.optimizer == "muon"``) Muon on the parameters ``muon_rule``
    picks and AdamW on the rest. Each named group is split into a decayed and an undecayed part;
    torch param groups carry ``name`` and ``base_lr`` (cfg.lr x lr_scale) for the schedule and logs.
    ``adjust_lr_fn='match_rms_adamw'`` lets Muon and AdamW share one learning rate."""
    rule = muon_rule or default_muon_rule
    adamw_groups, muon_groups = [], []
    for g in groups:
        base = cfg.lr * g["lr_scale"]
        for decay in (True, False):
            for use_muon in (False, True):
                ps = [p for n, p in g["params"] if decays(n, p) == decay
                      and (cfg.optimizer == "muon" and rule(n, p)) == use_muon]
                if ps:
                    spec = {"params": ps, "lr": base, "base_lr": base, "name": g["name"],
                            "weight_decay": g["weight_decay"] if decay else 0.0}
                    (muon_groups if use_muon else adamw_groups).append(spec)
    if cfg.optimizer == "muon" and not muon_groups:
        raise ValueError("optimizer=muon but no parameter matches the Muon rule (hidden 2-D weights); use adamw")
    params = [p for g in adamw_groups + muon_groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    # The fused kernel does the whole AdamW update in one pass (2x faster step on CPU, fewer launches
    # on GPU); it needs floating-point parameters on a device that has it.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    opts: list[torch.optim.Optimizer] = []
    if muon_groups:
        opts.append(torch.optim.Muon(muon_groups, lr=cfg.lr, adjust_lr_fn="match_rms_adamw"))
    if adamw_groups:
        opts.append(torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=cfg.betas, fused=fused))
    return opts


def lr_factor(step: int, steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warm-up from 1/(warmup+1),
    then cosine decay to ``min_ratio`` at ``steps`` (or constant)."""
    if step < warmup:
        start = 1.0 / (warmup + 1)
        return start + (1.0 - start) * step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over each group's ``base_lr``: the factor is a closed form of the step, so a
    resumed or extended run gets exactly the lr the new schedule gives at its step."""
    for g in opt.param_groups:
        g["initial_lr"] = g["base_lr"]
    f = lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def set_schedule_step(sch: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a scheduler (and its optimizer's lrs) at ``step`` without stepping through the steps before."""
    sch.last_epoch = step
    for g, base, f in zip(sch.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
        g["lr"] = base * f(step)
    sch._last_lr = [g["lr"] for g in sch.optimizer.param_groups]


def group_lrs(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, float]:
    """The current lr of every named group (``lr`` alone when there is one group)."""
    lrs = {}
    for o in optimizers:
        for g in o.param_groups:
            lrs.setdefault(g.get("name", "all"), g["lr"])
    return {"lr": next(iter(lrs.values()))} if len(lrs) == 1 else {f"lr/{k}": v for k, v in lrs.items()}


class EMA:
    """Exponential moving average of the trainable parameters (frozen parts are never copied), with
    a warm-up: the decay at update k is ``min(decay, (1 + k) / (10 + k))``, so a short run already
    samples from a useful average. Buffers are copied from the model at each update.

    ``state_dict`` / ``load_state_dict`` use the model's own parameter names; ``swapped(model)``
    puts the averages into the model for sampling and restores the trained weights afterwards.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone() for n in self.names}
        self.buffers = {n: b.detach().clone() for n, b in persistent_buffers(model).items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = dict(model.named_parameters())
        torch._foreach_lerp_([self.shadow[n] for n in self.names], [params[n].detach() for n in self.names],
                             1.0 - decay)
        for n, b in persistent_buffers(model).items():
            self.buffers[n].copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, **self.buffers}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in {**self.shadow, **self.buffers}.items():
            t.copy_(state[n])

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's trainable parameters and buffers with the averages (call twice to undo)."""
        params, buffers = dict(model.named_parameters()), persistent_buffers(model)
        for n in self.names:
            tmp = params[n].detach().clone()
            params[n].copy_(self.shadow[n])
            self.shadow[n].copy_(tmp)
        for n, b in buffers.items():
            tmp = b.detach().clone()
            b.copy_(self.buffers[n])
            self.buffers[n].copy_(tmp)
