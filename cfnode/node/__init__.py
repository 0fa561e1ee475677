"""One cfnode process and its parts: `process.Node` composes them (see its docstring for who does what)."""

from cfnode.node.process import Node

__all__ = ["Node"]
