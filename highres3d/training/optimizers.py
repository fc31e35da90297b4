"""The training optimizer: one Keras optimizer per layer group for discriminative learning rates.

Adam divides each update by the running RMS of the gradient, so multiplying a
group's gradients by ``m`` leaves its Adam updates (nearly) unchanged: scaling
gradients does not give a group a different learning rate.  Discriminative
rates (Howard & Ruder 2018) therefore need one optimizer per group, each with
its own learning rate and its own moment estimates.  :class:`GroupOptimizer`
holds them and routes every gradient to the optimizer of its variable's group.

Every optimizer is built on *all* parameters of its group, frozen or not, so
the optimizer state has the same variables in every stage of a multi-stage run
(a group unfrozen later starts with zero moments) and a checkpoint restores
into the same list whatever is frozen.  The learning rates are variables set
before each step (:meth:`GroupOptimizer.set_learning_rates`) from the base rate
of the current stage and iteration (:func:`highres3d.training.stages.scheduled_lr`)
times each group's multiplier.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: The key of the single optimizer used when no group has its own rate.
ALL_GROUPS = "all"


def make_optimizer(name: str, lr: float) -> Any:
    """A fresh Keras optimizer of ``training.optimizer`` with a settable (variable) learning rate.

    Args:
        name: ``"adam"``, ``"adamw"``, ``"sgd"`` or ``"rmsprop"``.
        lr: the initial learning rate.
    """
    import keras

    makers: dict[str, Callable[[], Any]] = {
        "adam": lambda: keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8),
        "adamw": lambda: keras.optimizers.AdamW(lr),
        "sgd": lambda: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
        "rmsprop": lambda: keras.optimizers.RMSprop(lr),
    }
    return makers[name]()


class GroupOptimizer:
    """One optimizer per layer group (or one for all), each with its own learning rate and state.

    Args:
        model: a :class:`~highres3d.models.HighResNet3D`.
        optimizer: ``training.optimizer`` (``"adam"``, ``"sgd"`` ...).
        lr: the initial base learning rate.
        per_group: one optimizer per layer group (``True``) or one for every
            parameter (``False``: plain training, the only mode that allows
            loss scaling).
        mixed_precision: wrap the single optimizer in a ``LossScaleOptimizer``
            (float16 training; bfloat16 needs no loss scaling and passes
            ``False``).

    Raises:
        ValueError: for ``per_group`` with ``mixed_precision``.
    """

    def __init__(self, model: Any, optimizer: str = "adam", lr: float = 1e-3, *, per_group: bool = True,
                 mixed_precision: bool = False) -> None:
        import keras

        from highres3d.models import GROUPS, is_state_variable, layer_group, named_weights

        if per_group and mixed_precision:
            raise ValueError("per-group optimizers cannot share a loss scale; use per_group=False for float16 "
                             "mixed precision, or bfloat16, which needs no loss scaling")
        self.per_group = per_group
        members: dict[str, list[Any]] = {}
        self._group_of: dict[str, str] = {}
        for path, variable in named_weights(model).items():
            if is_state_variable(path):
                continue
            group = (layer_group(path) or ALL_GROUPS) if per_group else ALL_GROUPS
            members.setdefault(group, []).append(variable)
            self._group_of[path] = group
        order = [g for g in (*GROUPS, ALL_GROUPS) if g in members]
        self.optimizers: dict[str, Any] = {}
        for group in order:
            opt = make_optimizer(optimizer, lr)
            if mixed_precision:
                opt = keras.optimizers.LossScaleOptimizer(opt)
            opt.build(members[group])
            self.optimizers[group] = opt

    @property
    def groups(self) -> list[str]:
        """The optimizers' keys: layer group names, or ``["all"]``."""
        return list(self.optimizers)

    @property
    def variables(self) -> list[Any]:
        """Every optimizer's variables (iterations, learning rate, slots), group by group in network order."""
        return [v for opt in self.optimizers.values() for v in opt.variables]

    def learning_rates(self) -> dict[str, float]:
        """The current learning rate of each optimizer."""
        import numpy as np

        return {g: float(np.asarray(_inner(opt).learning_rate)) for g, opt in self.optimizers.items()}

    def set_learning_rates(self, base_lr: float, multipliers: Mapping[str, float] | None = None) -> None:
        """Sets each optimizer's rate to ``base_lr`` times its group's multiplier.

        Args:
            base_lr: the base learning rate for this iteration.
            multipliers: ``{group: multiplier}`` (missing groups: 1); ignored
                when there is one optimizer for all groups.
        """
        multipliers = multipliers or {}
        for group, opt in self.optimizers.items():
            factor = 1.0 if group == ALL_GROUPS else float(multipliers.get(group, 1.0))
            _inner(opt).learning_rate = base_lr * factor

    def scale_loss(self, loss: Any) -> Any:
        """The loss scaled for mixed precision (unchanged otherwise)."""
        if len(self.optimizers) == 1:
            opt = next(iter(self.optimizers.values()))
            if hasattr(opt, "scale_loss"):
                return opt.scale_loss(loss)
        return loss

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Any]]) -> None:
        """Applies each gradient with the optimizer of its variable's group.

        Only the variables given are updated (the trainable ones of the current
        stage); an optimizer none of whose variables is given does nothing and
        keeps its iteration count.
        """
        routed: dict[str, tuple[list[Any], list[Any]]] = {}
        for grad, variable in grads_and_vars:
            group = self._group_of.get(variable.path)
            if group is None:
                raise ValueError(f"{variable.path}: not a parameter of the model this optimizer was built for")
            grads, variables = routed.setdefault(group, ([], []))
            grads.append(grad)
            variables.append(variable)
        for group, (grads, variables) in routed.items():
            self.optimizers[group].apply_gradients(zip(grads, variables))


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "inner_optimizer", optimizer)


__all__ = ["ALL_GROUPS", "GroupOptimizer", "make_optimizer"]
