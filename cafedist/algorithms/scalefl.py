"""ScaleFL: width- and depth-scaled sub-models per client resource level, exit-weighted
self-distillation, element-wise averaging over holders.

Source: Ilhan, Su, Liu, "ScaleFL: Resource-Adaptive Federated Learning with Heterogeneous
Clients" (CVPR 2023), reference repository git-disl/scale-fl. Clients are split into
resource levels (reference: 4 levels of 25 %, assigned by a seeded permutation); level l
trains a sub-model that keeps the first ``widths[l]`` fraction of every hidden channel
dimension (reference ``vertical_scale_ratios`` 0.7, 0.7, 0.75, 1) and the first
``depths[l]`` exits (reference ``horizontal_scale_ratios`` 1, 2, 3, 4 of 4 exits). With L
exits of its own, a client minimises
``sum_j (j+1) [CE(z_j, y) + gamma T^2 KL(softmax(z_L/T) || softmax(z_j/T))] / (L(L+1)/2)``
(the last exit: CE only), T = 3, the KD term only after ``kd_start`` of the rounds. Every
parameter element is averaged over the clients that hold it.

Width scaling is a holding mask on the full-size model: ``shared_mask`` returns, per
parameter, a bool tensor of the elements a level holds. Before local training a narrow
client zeroes the elements it does not hold and a gradient hook keeps their gradients at
zero, so they are never trained and -- zero weights into and out of every dropped channel --
the forward pass ignores them (plain CNN: exactly the narrow network; with GroupNorm the
zeroed channels still enter their group's statistics).

Deviations:

* the reference KD term uses ``nn.KLDivLoss()`` with its default element-wise mean (an extra
  division by the number of classes) and does not detach the last exit; we use the standard
  batch-mean KL with a detached teacher, so at equal ``gamma`` our term is C times stronger;
  ``gamma`` defaults to 0.05 (the reference's AgNews setting; its global default is 0);
* averaging is sample-weighted over holders (the reference counts holders equally);
* the reference's ``Scaler`` (conv outputs divided by the width ratio in a narrow model)
  acts in training mode only, since evaluation runs the global model;
* depth ``ceil((l+1) m / levels)`` when ``depths`` is not given, for any number of exits m;
* evaluation: ScaleFL learns one global model; every client keeps a copy of it
  (``non_holders_receive``), re-extracts its sub-model at the start of each local update, and
  is evaluated with the global model at every exit (ScaleFL's "global" evaluation). This needs
  the loop to honour ``Algorithm.non_holders_receive``; without it a client is evaluated with
  its own sub-model (unheld elements zero, deeper layers at their initial weights);
* width masks follow the layout of the conv families (``cnn``, ``resnet18``): the input
  channels of the first conv and the class dimension of each exit's final Linear are never
  scaled. Width ratios below 1 are refused for other architectures (the transformer), where
  depth scaling still works.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cafedist.algorithms.base import Check, ClientView, LocalBatch, Setup
from cafedist.algorithms.common import DepthScaled, equal_groups, is_head
from cafedist.algorithms.proxy_math import kd_loss
from cafedist.errors import ConfigError
from cafedist.rng import generator

_KD_ON = "scalefl.kd_on"  # client state: is the KD term active this round
_INPUT_CONV = re.compile(r"blocks\.0\.(?:0\.)+weight")  # first conv of block 0 (cnn, resnet18 stem)


@dataclass
class ScaleFLParams:
    """Resource levels and ScaleFL's self-distillation."""

    widths: list[float] = field(default_factory=lambda: [0.7, 0.7, 0.75, 1.0])  # channel ratio per level
    depths: list[int] = field(default_factory=list)  # exits per level; []: spread evenly over the exits
    gamma: float = 0.05  # weight of the KD term
    tau: float = 3.0  # KD temperature
    kd_start: float = 0.25  # KD only in rounds t > kd_start * train.rounds

    def checks(self) -> list[Check]:
        widths_ok = bool(self.widths) and all(isinstance(w, (int, float)) and 0 < w <= 1 for w in self.widths)
        depths_ok = not self.depths or (len(self.depths) == len(self.widths)
                                        and all(isinstance(d, int) and d >= 1 for d in self.depths))
        return [("widths", widths_ok, "a non-empty list of ratios in (0, 1]"),
                ("depths", depths_ok, f"[] or {len(self.widths)} integers >= 1 (one per entry of widths)"),
                ("gamma", self.gamma >= 0, ">= 0"), ("tau", self.tau > 0, "> 0"),
                ("kd_start", 0 <= self.kd_start <= 1, "in [0, 1]")]


def kept(size: int, ratio: float) -> int:
    """Channels a sub-model of width ``ratio`` keeps out of ``size`` (the reference's ``int``, at least 1)."""
    return max(1, int(size * ratio + 1e-9))


def width_mask(key: str, shape: tuple[int, ...], ratio: float, num_classes: int) -> Tensor:
    """Bool mask of the elements of parameter ``key`` a width-``ratio`` sub-model holds.

    Conv weights ``[out, in, kh, kw]`` keep the leading channels of both dims (all input
    channels of the network's first conv); an exit head's final Linear ``[classes, features]``
    keeps every class and the leading features; vectors (biases, norm affines) keep the leading
    channels, except a head's class-sized vector (its Linear bias) which is kept whole --
    harmless if it is in fact a channel vector, since the Linear ignores dropped channels.
    """
    mask = torch.zeros(shape, dtype=torch.bool)
    if len(shape) == 4:
        cols = shape[1] if _INPUT_CONV.fullmatch(key) else kept(shape[1], ratio)
        mask[:kept(shape[0], ratio), :cols] = True
    elif len(shape) == 2 and is_head(key):
        mask[:, :kept(shape[1], ratio)] = True
    elif len(shape) == 1:
        mask[:shape[0] if is_head(key) and shape[0] == num_classes else kept(shape[0], ratio)] = True
    else:
        raise ConfigError(f"algorithm.scalefl.widths: width ratios below 1 need a conv model (cnn, resnet18); "
                          f"parameter {key} of shape {list(shape)} cannot be width-scaled")
    return mask


class ScaleFL(DepthScaled):
    """Width+depth-scaled sub-models of one global early-exit network."""

    name = "scalefl"
    Params = ScaleFLParams

    def __init__(self, params: ScaleFLParams, setup: Setup):
        super().__init__(params, setup)
        m, levels = setup.num_exits, len(params.widths)
        self.level_depths = list(params.depths) or [math.ceil((lv + 1) * m / levels) for lv in range(levels)]
        if max(self.level_depths) > m:
            raise ConfigError(f"algorithm.scalefl.depths: the model has {m} exits, got {params.depths}")
        order = torch.randperm(setup.num_clients, generator=generator(setup.seed, "scalefl", "levels"))
        self.levels = equal_groups(setup.num_clients, levels, order)
        self.depths = [self.level_depths[level] for level in self.levels]
        self._masks: dict[tuple[int, str], Tensor | bool] = {}

    def level(self, cid: int) -> int:
        """Resource level of client ``cid`` (index into ``widths`` / ``depths``)."""
        return self.levels[cid]

    def width(self, cid: int) -> float:
        """Channel ratio of client ``cid``'s sub-model."""
        return float(self.params.widths[self.level(cid)])

    # ---------------------------------------------------------------- holding masks
    def shared_mask(self, cid: int, key: str, tensor: Tensor) -> bool | Tensor:
        level = self.level(cid)
        cached = self._masks.get((level, key))
        if cached is None:
            cached = super().shared_mask(cid, key, tensor)  # False beyond the client's depth
            if cached and self.width(cid) < 1.0:
                cached = width_mask(key, tuple(tensor.shape), self.width(cid), self.setup.num_classes)
            self._masks[(level, key)] = cached
        return cached

    def _extract_submodel(self, cid: int, model: nn.Module) -> None:
        """Turn ``model`` into client ``cid``'s sub-model for local training.

        Zeroes the elements the client does not hold; the first time, also installs hooks
        that keep their gradients at zero and, as the reference's ``Scaler``, divide every
        conv output by the width ratio in training mode (a narrow conv sums over fewer input
        channels; evaluation runs the global model unscaled). Hooks live on the Parameter and
        module objects, which ``load_state_dict`` keeps.
        """
        first = not getattr(model, "_scalefl_hooked", False)
        for key, p in model.named_parameters():
            mask = self.shared_mask(cid, key, p)
            if not isinstance(mask, Tensor):
                continue  # held whole (or beyond the client's depth: never in its forward pass)
            mask = mask.to(p.device)
            with torch.no_grad():
                p.mul_(mask)
            if first:
                p.register_hook(lambda g, m=mask: g * m)
        ratio = self.width(cid)
        if first and ratio < 1:
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    module.register_forward_hook(
                        lambda mod, inp, out, s=1.0 / ratio: out * s if mod.training else out)
        model._scalefl_hooked = True

    @classmethod
    def rounds_dependence(cls, params: ScaleFLParams, rounds: int, done: int, new_rounds: int) -> list[str]:
        def on(t: int, total: int) -> bool:
            return params.gamma > 0 and t > params.kd_start * total
        if all(on(t, rounds) == on(t, new_rounds) for t in range(done)):
            return []
        return [f"scalefl's self-distillation, on after round kd_start {params.kd_start} x {rounds}, was on or "
                f"off by that total in rounds 0-{done - 1}"]

    # ---------------------------------------------------------------- client side
    def on_local_start(self, client: ClientView, round_idx: int) -> None:
        self._extract_submodel(client.cid, client.model)
        on = self.params.gamma > 0 and round_idx > self.params.kd_start * self.setup.rounds
        client.state[_KD_ON] = torch.tensor(on)

    def local_loss(self, state: dict[str, Tensor], batch: LocalBatch) -> Tensor:
        z, y = batch.logits, batch.y
        depth = len(z)
        kd = bool(state.get(_KD_ON, False))
        teacher = F.softmax(z[-1].detach() / self.params.tau, dim=1)
        loss = z[-1].new_zeros(())
        for j, zj in enumerate(z):
            term = F.cross_entropy(zj, y)
            if kd and j < depth - 1:
                term = term + self.params.gamma * kd_loss(zj, teacher, self.params.tau)
            loss = loss + (j + 1) * term
        return loss / (depth * (depth + 1) / 2)
