"""A tiny neural-network toolkit in plain NumPy, to show how the batchnorm layers fit a training loop.

This module is teaching material, not a framework. It is what :mod:`batchnorm.demo` and the quickstart
notebook train with, and it is meant to be read. Every layer follows the same three-part contract that
:class:`batchnorm.BatchNorm` follows, so our layers drop into a NumPy loop next to your own:

forward
    ``y = layer(x)`` computes the output and keeps what the backward pass needs.
backward
    ``dx = layer.backward(dy)`` takes dLoss/dy of the *last* forward call, returns dLoss/dx and
    **overwrites** the layer's gradients (``grad_weight``/``grad_bias``); nothing accumulates, so
    there is no ``zero_grad``.
parameters and gradients
    trainable arrays are the attributes ``weight``/``bias`` (``None`` when absent), their gradients
    ``grad_weight``/``grad_bias``. An optimizer updates ``weight`` and ``bias`` **in place**.

Plus ``train()``/``eval()``, which switch a batchnorm layer between batch statistics and running
statistics (the other layers here ignore the mode).

A training step then reads::

    model = Sequential(Linear(64, 100, bias=False, rng=rng), batchnorm.BatchNorm1d(100), ReLU(),
                       Linear(100, 10, rng=rng))
    loss_fn = SoftmaxCrossEntropy()
    opt = SGD(lr=0.1)
    for xb, yb in batches:
        loss = loss_fn(model(xb), yb)             # forward
        model.backward(loss_fn.backward())        # backward: fills every layer's grad_* arrays
        opt.step(model.params_and_grads())        # update weights in place
    model.eval()                                  # BN now uses its running statistics

Only NumPy is needed here.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "Linear", "Sigmoid", "ReLU", "Sequential", "SoftmaxCrossEntropy", "SGD",
    "params_and_grads", "accuracy", "iterate_minibatches",
]

# Attribute names of (parameter, gradient) pairs. batchnorm.BatchNorm uses the same names.
_PARAM_NAMES = (("weight", "grad_weight"), ("bias", "grad_bias"))


def params_and_grads(layer):
    """Yield the ``(parameter, gradient)`` array pairs of one layer (skips absent ones).

    Works for :class:`Linear` and for :class:`batchnorm.BatchNorm` alike: both keep trainable arrays
    in ``weight``/``bias`` and their gradients in ``grad_weight``/``grad_bias``. Call it after
    ``backward`` (a layer may create or replace its gradient arrays there).
    """
    for pname, gname in _PARAM_NAMES:
        p = getattr(layer, pname, None)
        g = getattr(layer, gname, None)
        if p is not None and g is not None:
            yield p, g


class Linear:
    """Fully connected layer ``y = x @ weight + bias``, NumPy-style weight of shape (in, out).

    Weights start Glorot/Xavier-uniform, ``U(±sqrt(6 / (in + out)))``, the classic choice for
    sigmoid networks; the bias starts at zero. A layer followed by batch normalization needs no bias
    (BN subtracts the mean and adds its own ``bias``): pass ``bias=False``. With this (in, out)
    layout, fold a following BN into the layer with ``batchnorm.fold_into(W, b, bn, axis=-1)``.
    """

    def __init__(self, in_features, out_features, *, bias=True, rng=None, dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        bound = np.sqrt(6.0 / (in_features + out_features))
        self.weight = rng.uniform(-bound, bound, (in_features, out_features)).astype(dtype)
        self.bias = np.zeros(out_features, dtype) if bias else None
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias) if bias else None
        self._x = None

    def __call__(self, x):
        self._x = x
        y = x @ self.weight
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy):
        """dLoss/dx of the last call, given dy = dLoss/dy; overwrites ``grad_weight``/``grad_bias``."""
        np.matmul(self._x.T, dy, out=self.grad_weight)
        if self.bias is not None:
            np.sum(dy, axis=0, out=self.grad_bias)
        return dy @ self.weight.T

    def __repr__(self):
        n_in, n_out = self.weight.shape
        return f"Linear({n_in}, {n_out}, bias={self.bias is not None})"


class Sigmoid:
    """Logistic sigmoid, computed as ``0.5 * (1 + tanh(x / 2))`` (no overflow for large ``|x|``)."""

    def __call__(self, x):
        self._y = 0.5 * (1.0 + np.tanh(0.5 * x))
        return self._y

    def backward(self, dy):
        """dLoss/dx of the last call, given dy = dLoss/dy."""
        return dy * self._y * (1.0 - self._y)

    def __repr__(self):
        return "Sigmoid()"


class ReLU:
    """Rectified linear unit ``max(x, 0)``."""

    def __call__(self, x):
        self._mask = x > 0
        return np.where(self._mask, x, 0).astype(x.dtype, copy=False)

    def backward(self, dy):
        """dLoss/dx of the last call, given dy = dLoss/dy."""
        return np.where(self._mask, dy, 0).astype(dy.dtype, copy=False)

    def __repr__(self):
        return "ReLU()"


class Sequential:
    """Chain of layers: forward left to right, backward right to left."""

    def __init__(self, *layers):
        self.layers = list(layers)
        self.training = True

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        """Run every layer's ``backward``, last to first; returns dLoss/dx of the first layer's input."""
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def params_and_grads(self):
        """``(parameter, gradient)`` pairs of every layer, in order (see :func:`params_and_grads`)."""
        return [pair for layer in self.layers for pair in params_and_grads(layer)]

    def train(self, mode=True):
        """Put every layer that has a mode (the batchnorm layers) in training (or eval) mode."""
        self.training = mode
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train(mode)
        return self

    def eval(self):
        """``train(False)``: every layer that has a mode in eval mode; returns the container."""
        return self.train(False)

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels, fused for stability.

    ``loss = loss_fn(logits, labels)`` returns a Python float; ``loss_fn.backward()`` returns
    dLoss/dlogits ``= (softmax(logits) - onehot(labels)) / batch_size``.
    """

    def __call__(self, logits, labels):
        z = logits - logits.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        self._p = np.exp(log_p)
        self._labels = np.asarray(labels)
        n = logits.shape[0]
        return float(-log_p[np.arange(n), self._labels].mean())

    def backward(self):
        """dLoss/dlogits of the last call, ``(softmax(logits) - onehot(labels)) / batch_size``."""
        n = self._p.shape[0]
        d = self._p.copy()
        d[np.arange(n), self._labels] -= 1.0
        d /= n
        return d


class SGD:
    """Stochastic gradient descent, optionally with (heavy-ball) momentum.

    ``opt.step(pairs)`` updates each parameter in place: ``p -= lr * g`` (or with momentum
    ``v = momentum * v + g;  p -= lr * v``). Pass the pairs in the same order every step.
    """

    def __init__(self, lr=0.01, momentum=0.0):
        self.lr = lr
        self.momentum = momentum
        self._velocity = None

    def step(self, pairs):
        """Update every parameter in place from its gradient; ``pairs`` is ``(parameter, gradient)``
        pairs, such as :meth:`Sequential.params_and_grads` returns, in the same order every step."""
        pairs = list(pairs)
        if self.momentum:
            if self._velocity is None:
                self._velocity = [np.zeros_like(p) for p, _ in pairs]
            for (p, g), v in zip(pairs, self._velocity):
                v *= self.momentum
                v += g
                p -= self.lr * v
        else:
            for p, g in pairs:
                p -= self.lr * g


def accuracy(logits, labels):
    """Fraction of rows whose arg-max equals the label."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def iterate_minibatches(n, batch_size, rng):
    """Endless stream of index arrays: shuffle ``range(n)`` each epoch, yield full batches."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]
