"""DP-SGD's per-sample clipping for Linear and Conv2d layers, without Linear per-sample gradients.

DP-SGD clips each sample's whole gradient to `max_grad_norm`, then sums. Opacus's hooks
build every layer's per-sample gradients (batch x out x in numbers for a Linear layer),
take their norms, then scale and sum them. A Linear layer that sees one vector a_i per
sample and gets the output gradient g_i has the per-sample gradient g_i a_i^T: its norm is
|g_i| |a_i| and the clipped sum is (c * g)^T a, so neither needs the per-sample gradients
(the "book-keeping" of Bu et al., 2023). A Conv2d layer's per-sample gradients are small
(out x in x k x k): built once from the unfolded input, as Opacus builds them, and used for
both the norm and the sum. The arithmetic is Opacus's flat clipping (the same norms, the
same factor max_grad_norm / (norm + 1e-6), at most 1); noise, scaling and accounting stay
Opacus's `DPOptimizer`'s.

Only layers whose computation is known exactly qualify: `nn.Linear` and `nn.Conv2d`
(groups 1, zero padding), their own weight and bias the module's only trainable
parameters, none shared. Any other module keeps Opacus's hooks (`fast_layers` says which).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn.utils import parametrize

Layer = nn.Linear | nn.Conv2d
Pair = tuple[torch.Tensor, torch.Tensor]  # (layer input, gradient of the layer's output)
Sums = dict[torch.Tensor, torch.Tensor]  # parameter -> its clipped sum


def _supported(layer: nn.Module) -> bool:
    # Exact types: a subclass may compute something else in its forward.
    if type(layer) is nn.Linear:
        return True
    return (
        type(layer) is nn.Conv2d
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def fast_layers(module: nn.Module) -> list[Layer] | None:
    """The layers holding `module`'s trainable parameters, if all qualify; else None."""
    layers: list[Layer] = []
    owned: list[int] = []
    for layer in module.modules():
        own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(layer, Layer) or not _supported(layer):
            return None
        if parametrize.is_parametrized(layer):
            return None
        if any(p is not layer.weight and p is not layer.bias for p in own):
            return None
        layers.append(layer)
        owned += [id(p) for p in own]
    if len(owned) != len(set(owned)):  # a parameter tied between layers
        return None
    return layers


class FastClipping:
    """Records each layer's inputs and output gradients during a step, then clips from them."""

    def __init__(self, layers: list[Layer], loss_reduction: str = "mean") -> None:
        self.layers = layers
        self.loss_reduction = loss_reduction
        self._inputs: dict[nn.Module, list[torch.Tensor]] = {layer: [] for layer in layers}
        self._pairs: dict[nn.Module, list[Pair]] = {layer: [] for layer in layers}
        for layer in layers:  # for the module's life, as Opacus's hooks with wrap_model=False
            layer.register_forward_hook(self._record_input)
            layer.register_full_backward_hook(self._record_gradient)

    def _record_input(self, layer: nn.Module, inputs: tuple, output: Any) -> None:
        if layer.training and torch.is_grad_enabled():
            self._inputs[layer].append(inputs[0].detach())

    def _record_gradient(self, layer: nn.Module, grad_input: Any, grad_output: Any) -> None:
        pending = self._inputs[layer]
        if pending:
            # As Opacus pairs them: a layer run twice gets its gradients in reverse order.
            inputs = pending.pop()
            self._pairs[layer].append((inputs, grad_output[0].detach().to(inputs.dtype)))

    def clear(self) -> None:
        """Forget what the step in progress recorded."""
        for layer in self.layers:
            self._inputs[layer].clear()
            self._pairs[layer].clear()

    def clear_gradients(self) -> None:
        """Forget the output gradients recorded, not the inputs awaiting theirs."""
        for layer in self.layers:
            self._pairs[layer].clear()

    def clipped_sums(self, max_grad_norm: float) -> Sums:
        """Each parameter's sum over samples of its gradient, every sample's whole gradient
        clipped to `max_grad_norm` (Opacus's flat clipping); then forgets the step."""
        terms = [
            term
            for layer in self.layers
            if self._pairs[layer]
            for term in _terms(layer, self._pairs[layer], self.loss_reduction)
        ]
        self.clear()
        if not terms:
            return {}
        norms = torch.stack([squares for _, squares, _ in terms]).sum(0).sqrt()
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        return {param: clipped_sum(factor) for param, _, clipped_sum in terms}


Term = tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _terms(layer: Layer, pairs: list[Pair], loss_reduction: str) -> list[Term]:
    """For each trainable parameter of `layer`: the parameter, its per-sample squared
    gradient norms, and its clipped sum given the per-sample clip factors."""
    if loss_reduction == "mean":  # the gradients of each sample's own loss, as Opacus
        pairs = [(a, g * a.shape[0]) for a, g in pairs]
    weight = layer.weight if layer.weight.requires_grad else None
    bias = layer.bias if layer.bias is not None and layer.bias.requires_grad else None
    terms: list[Term] = []
    if isinstance(layer, nn.Linear) and len(pairs) == 1 and pairs[0][0].dim() == 2:
        a, g = pairs[0]  # one vector per sample: |g_i a_i^T| = |g_i| |a_i|
        g_squares = _squared_norms(g)
        if weight is not None:
            terms.append(
                (weight, g_squares * _squared_norms(a), lambda c: (c[:, None] * g).t() @ a)
            )
        if bias is not None:
            terms.append((bias, g_squares, lambda c: c @ g))
        return terms
    per_weight, per_bias = _per_sample(layer, pairs)
    if weight is not None:
        shape = weight.shape
        terms.append(
            (
                weight,
                _squared_norms(per_weight),
                lambda c: torch.einsum("n,n...->...", c, per_weight).reshape(shape),
            )
        )
    if bias is not None:
        terms.append((bias, _squared_norms(per_bias), lambda c: c @ per_bias))
    return terms


def _per_sample(layer: Layer, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weight and bias gradients (Opacus's formulas), summed over the layer's
    uses in the step."""
    weight, bias = [], []
    for a, g in pairs:
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(
                a,
                _pair(layer.kernel_size),
                _pair(layer.dilation),
                _pair(layer.padding),  # type: ignore[arg-type]  # a string is refused
                _pair(layer.stride),
            )
            out = g.flatten(2)
            weight.append(torch.bmm(out, patches.transpose(1, 2)))
            bias.append(out.sum(2))
        else:
            weight.append(torch.einsum("n...o,n...i->noi", g, a))
            bias.append(g.reshape(g.shape[0], -1, g.shape[-1]).sum(1))
    return sum(weight[1:], weight[0]), sum(bias[1:], bias[0])


def _squared_norms(per_sample: torch.Tensor) -> torch.Tensor:
    # One pass, no squared copy of a per-sample tensor; in float32 under mixed precision,
    # where a half-precision norm could come out low and let a sample through unclipped.
    return torch.linalg.vector_norm(per_sample.flatten(1), dim=1, dtype=torch.float32).square()


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    return (value[0], value[1])


class FastDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer (noise, scaling, skipped steps, accountant hook) clipping with
    `FastClipping` instead of per-sample gradients."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, clipping: FastClipping, **kwargs: Any):
        super().__init__(optimizer, **kwargs)
        self.clipping = clipping

    @property
    def accumulated_iterations(self) -> int:
        """One forward and backward per step: the config refuses gradient accumulation."""
        return 1

    def clip_and_accumulate(self) -> None:
        """Add the step's clipped per-sample gradients to each parameter's `summed_grad`."""
        sums = self.clipping.clipped_sums(self.max_grad_norm)
        for p in self.params:
            # A layer that did not run this step contributes no gradient.
            grad = sums[p].to(p.dtype) if p in sums else torch.zeros_like(p)
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        """Clip and accumulate; unless the step is skipped, add noise, scale, account."""
        # Opacus's pre_step without its test for per-sample gradients, which never exist here.
        if len(self.params) == 0:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Opacus's zero_grad; and forget gradients recorded by a backward no step used."""
        super().zero_grad(set_to_none)
        # Not the inputs: Lightning zeroes gradients between the forward and the backward.
        self.clipping.clear_gradients()
