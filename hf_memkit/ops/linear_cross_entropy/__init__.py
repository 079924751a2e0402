"""Cross-entropy of a linear layer's output without the N×V logit matrix (Cut Cross-Entropy).

``linear_cross_entropy(e, c, targets)`` equals ``F.cross_entropy((e @ c.T).float(), targets)`` and its
gradients, in O(N + V) extra memory. See :func:`~.function.linear_cross_entropy`.
"""

from .function import linear_cross_entropy
from .problem import LinearCrossEntropyError, TokenStats
from .reference import naive_linear_cross_entropy

__all__ = ["linear_cross_entropy", "naive_linear_cross_entropy", "LinearCrossEntropyError", "TokenStats"]
