"""What ``keras.ops`` lacks, one small function per Keras backend.

The models are written with ``keras.ops`` and Keras layers, so they run on every Keras 3
backend: TensorFlow (the default), JAX, and PyTorch where it is installed. A few operations
have no ``keras.ops`` form; each has one function here that dispatches on the active backend:

* :func:`lgamma`, the log-gamma function (the Beta log-density's normaliser);
* :func:`betainc`, the regularised incomplete Beta function (the mixture's CDF);
* :func:`value_and_gradient`, a value and its gradient with respect to a tensor (GradCAM);
* :func:`compile_function`, a compiled function (``tf.function``, ``jax.jit``, or eager);
* :func:`backend` and :func:`has_gpu`.

Each backend's library is imported inside the function that needs it, never at module level,
so importing this module, or running any of it under ``KERAS_BACKEND=jax``, imports neither
TensorFlow nor PyTorch: the JAX backend runs where TensorFlow is not installed at all.
"""

import math

import keras
from keras import ops

#: Terms of the continued fraction of :func:`betainc_continued_fraction`. It converges in
#: about sqrt(max(a, b)) terms (Press et al., Numerical Recipes, section 6.4), so 256 terms
#: hold for a and b up to about 60 000, beyond the Beta parameters the ICL head predicts.
BETAINC_TERMS = 256


def backend():
    """Name of the active Keras backend: ``"tensorflow"``, ``"jax"``, ``"torch"``..."""
    return keras.backend.backend()


def _unsupported(operation):
    return NotImplementedError(f"{operation} has no implementation for the Keras backend '{backend()}'; "
                               "use KERAS_BACKEND=tensorflow, jax or torch")


def lgamma(x):
    """Log of the absolute value of the gamma function, element-wise.

    ``tf.math.lgamma`` on TensorFlow, ``jax.scipy.special.gammaln`` on JAX, ``torch.lgamma``
    on PyTorch.
    """
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.math.lgamma(ops.convert_to_tensor(x))
    if name == "jax":
        import jax.scipy.special

        return jax.scipy.special.gammaln(ops.convert_to_tensor(x))
    if name == "torch":
        import torch

        return torch.lgamma(ops.convert_to_tensor(x))
    raise _unsupported("lgamma")


#: Minimax coefficients of the Stirling correction, DiDonato & Morris (1988, NSWC TR 88-365), eq. 32.
_STIRLING_CORRECTION = (0.833333333333333e-01, -0.277777777760991e-02, 0.793650666825390e-03,
                        -0.595202931351870e-03, 0.837308034031215e-03, -0.165322962780713e-02)
#: Arguments from which the Stirling series replaces lgamma in :func:`log_beta_function`.
_STIRLING_FROM = 8.0


def _stirling_correction(x):
    """lgamma(x) - [(x - 1/2) log x - x + log(2 pi) / 2], accurate for x >= 8."""
    inverse_square = 1.0 / (x * x)
    total = _STIRLING_CORRECTION[-1]
    for coefficient in reversed(_STIRLING_CORRECTION[:-1]):
        total = total * inverse_square + coefficient
    return total / x


def log_beta_function(a, b):
    """log B(a, b) = lgamma(a) + lgamma(b) - lgamma(a + b), element-wise, for a, b > 0.

    Subtracting the log-gammas of large arguments loses the digits they share (lgamma(500) =
    2605, so in float32 the difference is off by up to about 2e-4), so for arguments of 8 or more the Stirling terms are cancelled symbolically and only their
    corrections subtracted, as ``tfp.math.lbeta`` does (DiDonato & Morris 1988, NSWC TR 88-365,
    section IV). With x = min(a, b), y = max(a, b):

    * y < 8: lgamma(x) + lgamma(y) - lgamma(x + y);
    * x < 8 <= y: lgamma(x) + [lgamma(y) - lgamma(x + y)], the bracket as
      -(x + y - 1/2) log(1 + x / y) - x log y + x + D(y) - D(x + y);
    * x >= 8: log(2 pi) / 2 - log(y) / 2 + D(x) + D(y) - D(x + y) + (x - 1/2) log(x / (x + y))
      - y log(1 + x / y);

    with D the Stirling correction (:func:`_stirling_correction`). Every branch is evaluated at
    arguments inside its own range, so the unused ones stay finite and so do the gradients.
    """
    a = ops.convert_to_tensor(a)
    b = ops.cast(ops.convert_to_tensor(b), a.dtype)
    # where, not minimum and maximum: at a tie those share the gradient between their arguments.
    ordered = a <= b
    x, y = ops.where(ordered, a, b), ops.where(ordered, b, a)
    small = lgamma(x) + lgamma(y) - lgamma(x + y)
    big_y = ops.where(y >= _STIRLING_FROM, y, _STIRLING_FROM)
    one_large = (lgamma(x) - (x + big_y - 0.5) * ops.log1p(x / big_y) - x * ops.log(big_y) + x
                 + _stirling_correction(big_y) - _stirling_correction(x + big_y))
    big_x = ops.where(x >= _STIRLING_FROM, x, _STIRLING_FROM)
    two_large = (0.5 * math.log(2.0 * math.pi) - 0.5 * ops.log(big_y)
                 + _stirling_correction(big_x) + _stirling_correction(big_y) - _stirling_correction(big_x + big_y)
                 + (big_x - 0.5) * ops.log(big_x / (big_x + big_y)) - big_y * ops.log1p(big_x / big_y))
    return ops.where(x >= _STIRLING_FROM, two_large, ops.where(y >= _STIRLING_FROM, one_large, small))


def _common_dtype(a, b, x):
    a = ops.convert_to_tensor(a)
    dtype = a.dtype if "float" in str(a.dtype) else keras.backend.floatx()
    return tuple(ops.cast(ops.convert_to_tensor(value), dtype) for value in (a, b, x))


def betainc(a, b, x):
    """Regularised incomplete Beta function I_x(a, b), the CDF at x of a Beta(a, b) distribution.

    The three arguments broadcast against each other (as NumPy's do) and are computed in the
    floating dtype of ``a``. ``tf.math.betainc`` on TensorFlow (which does not broadcast by
    itself, so the arguments are broadcast here), ``jax.scipy.special.betainc`` on JAX, and on
    PyTorch, which has none, :func:`betainc_continued_fraction`.
    """
    a, b, x = _common_dtype(a, b, x)
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        shape = tf.broadcast_dynamic_shape(tf.shape(a), tf.broadcast_dynamic_shape(tf.shape(b), tf.shape(x)))
        return tf.math.betainc(*(tf.broadcast_to(value, shape) for value in (a, b, x)))
    if name == "jax":
        import jax.scipy.special

        return jax.scipy.special.betainc(a, b, x)
    if name == "torch":
        return betainc_continued_fraction(a, b, x)
    raise _unsupported("betainc")


def betainc_continued_fraction(a, b, x, terms=BETAINC_TERMS):
    """I_x(a, b) from its continued fraction, in ``keras.ops`` only (the fallback of :func:`betainc`).

    The modified Lentz evaluation of Numerical Recipes (Press et al., 3rd ed., section 6.4,
    ``betacf``) with a fixed number of terms, so that it vectorises and compiles on any backend:

        I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...)))

    which converges fast for x < (a + 1) / (a + b + 2); beyond, I_x(a, b) = 1 - I_{1-x}(b, a).
    ``terms`` must exceed about sqrt(max(a, b)) (see :data:`BETAINC_TERMS`). Arguments
    broadcast; a, b > 0; x outside (0, 1) gives 0 below and 1 above.
    """
    a, b, x = _common_dtype(a, b, x)
    swap = x > (a + 1.0) / (a + b + 2.0)
    p, q = ops.where(swap, b, a), ops.where(swap, a, b)
    y = ops.clip(ops.where(swap, 1.0 - x, x), 1e-30, 1.0)
    tiny = 1e-30

    def away_from_zero(value):
        return ops.where(ops.abs(value) < tiny, tiny, value)

    c = ops.ones_like(y)
    d = 1.0 / away_from_zero(1.0 - (p + q) * y / (p + 1.0))
    fraction = d
    for m in range(1, terms + 1):
        for numerator in (m * (q - m) * y / ((p + 2.0 * m - 1.0) * (p + 2.0 * m)),
                          -(p + m) * (p + q + m) * y / ((p + 2.0 * m) * (p + 2.0 * m + 1.0))):
            d = 1.0 / away_from_zero(1.0 + numerator * d)
            c = away_from_zero(1.0 + numerator / c)
            fraction = fraction * d * c
    log_front = p * ops.log(y) + q * ops.log1p(-ops.minimum(y, 1.0 - 1e-7)) - log_beta_function(p, q)
    value = ops.clip(ops.exp(log_front) * fraction / p, 0.0, 1.0)
    value = ops.where(swap, 1.0 - value, value)
    return ops.where(x <= 0.0, ops.zeros_like(value), ops.where(x >= 1.0, ops.ones_like(value), value))


def value_and_gradient(fn, x):
    """A function's value and the gradient of the sum of its first output with respect to ``x``.

    Parameters
    ----------
    fn : callable
        ``fn(x) -> (score, aux)``: ``score`` a tensor (any shape; its sum is differentiated),
        ``aux`` any tensor returned alongside and not differentiated.
    x : tensor

    Returns
    -------
    score, aux, gradient
        ``fn(x)`` and d sum(score) / dx, of the shape of ``x``. When the rows of a batch never
        mix (as in a model at inference), row i of the gradient is that of score[i] alone.

    A ``tf.GradientTape`` watching ``x`` on TensorFlow, ``jax.value_and_grad`` on JAX (``fn``
    is traced: Keras layers read their variables as they do in ``jax.jit``), and
    ``torch.autograd.grad`` on PyTorch (with autograd on, whatever the caller's context).
    """
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            score, aux = fn(x)
        return score, aux, tape.gradient(score, x)
    if name == "jax":
        import jax
        import jax.numpy as jnp

        def total(x):
            score, aux = fn(x)
            return jnp.sum(score), (score, aux)

        (_, (score, aux)), gradient = jax.value_and_grad(total, has_aux=True)(ops.convert_to_tensor(x))
        return score, aux, gradient
    if name == "torch":
        import torch

        x = ops.convert_to_tensor(x).detach().requires_grad_(True)
        with torch.enable_grad():
            score, aux = fn(x)
            (gradient,) = torch.autograd.grad(score.sum(), x)
        return score.detach(), aux.detach(), gradient
    raise _unsupported("value_and_gradient")


def compile_function(fn, jit_compile=False, variables=None):
    """``fn`` compiled for the active backend, called like ``fn``.

    Parameters
    ----------
    fn : callable
        A function of tensors that may call Keras models and layers.
    jit_compile : bool
        On TensorFlow, compile with XLA (``tf.function(jit_compile=True)``). JAX always compiles
        with XLA; PyTorch runs eagerly either way.
    variables : list of keras.Variable, optional
        The variables ``fn`` reads (``model.variables``). On JAX they are passed to the compiled
        function at every call (under a ``keras.StatelessScope``) instead of being frozen into
        it as constants when it is traced, so later changes of the weights are seen.

    Returns
    -------
    callable
        ``tf.function(fn, reduce_retracing=True)`` on TensorFlow, ``jax.jit`` on JAX, ``fn``
        itself (eager) on other backends.
    """
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)
    if name == "jax":
        import jax

        if not variables:
            return jax.jit(fn)
        variables = list(variables)

        def stateless(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        compiled = jax.jit(stateless)

        def call(*args):
            return compiled([variable.value for variable in variables], *args)

        return call
    return fn


def has_gpu():
    """Whether the active backend computes on a GPU.

    ``tf.config.list_logical_devices("GPU")`` on TensorFlow, the platform of ``jax.devices()``
    on JAX, ``torch.cuda.is_available()`` on PyTorch; False on other backends.
    """
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    if name == "jax":
        import jax

        return any(device.platform in ("gpu", "cuda", "rocm") for device in jax.devices())
    if name == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False
