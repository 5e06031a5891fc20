"""The error every LiveAvatar node raises for bad input (importable without ComfyUI)."""

from __future__ import annotations


class LiveAvatarInputError(ValueError):
    """A node input that cannot be used. The message names the node, the input and the fix.

    ComfyUI shows the message in the UI and on `/history`; the server keeps running.
    """

    def __init__(self, node: str, input_name: str, problem: str) -> None:
        self.node = node
        self.input_name = input_name
        self.problem = problem
        super().__init__(f"{node}: input '{input_name}': {problem}")


__all__ = ["LiveAvatarInputError"]
