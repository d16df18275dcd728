"""Name suggestions for attention's modules: :func:`attnbench.common.names.closest`."""

from ..common.names import closest

__all__ = ["closest"]
