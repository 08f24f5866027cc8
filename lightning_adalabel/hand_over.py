"""The file through which a ``ddp_spawn``/``ddp_notebook`` fit hands the learned state back to the launching process.

Those strategies train in child processes: the callback object that the user holds is a copy that never trains. At
the end of the fit, rank 0 saves the callback's state to a file; the callback in the launching process (or in the
processes of the next such fit) reads it the next time it is asked for its state. Each callback, copies included, has
a file of its own, and only the process that made the callback deletes it.
"""

import os
import tempfile
import uuid
import weakref
from typing import Any, Dict, Optional

import torch
from torch import Tensor


class HandOverFile:
    """A per-callback file path in the temporary directory, owned by the process that made it.

    Example:
        >>> hand_over = HandOverFile()
        >>> hand_over.take() is None  # nothing was left
        True
        >>> hand_over.leave({"step": torch.tensor(3)})
        >>> hand_over.take()
        {'step': tensor(3)}
        >>> hand_over.take() is None  # taken by its owner: deleted
        True
    """

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.path = os.path.join(tempfile.gettempdir(), f"lightning_adalabel-{uuid.uuid4().hex}.pt")
        # A file nobody read is deleted when its callback goes away (never from a child process).
        weakref.finalize(self, _remove_owned_file, self.path, self.owner_pid)

    @property
    def in_owner(self) -> bool:
        """Whether this process made the file's callback (False in the children of a spawned fit)."""
        return os.getpid() == self.owner_pid

    def leave(self, state: Dict[str, Any]) -> None:
        """Save ``state`` (its tensors on the CPU) for the owner to take."""
        torch.save(_to_cpu(state), self.path)

    def take(self) -> Optional[Dict[str, Any]]:
        """The state left in the file, or ``None``; the owner deletes the file as it takes it."""
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        if self.in_owner:
            os.remove(self.path)
        return state

    def __getstate__(self) -> Dict[str, Any]:
        return {"owner_pid": self.owner_pid, "path": self.path}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Unpickled in a child process it is the owner's file; unpickled in the owner's process it is a copy's, which
        # the callback replaces with a file of its own.
        self.__dict__.update(state)


def _remove_owned_file(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid and os.path.exists(path):
        os.remove(path)


def _to_cpu(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    return state
