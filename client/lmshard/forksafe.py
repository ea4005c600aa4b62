"""Reopening LMDB environments in a forked child without touching the parent's reader slots.

LMDB environments must not be used across ``fork()``. A child must open its own handle, and it
must not ``close()`` the inherited one: ``mdb_env_close`` clears every reader slot carrying the
opener's pid, which is the parent's, so the parent's live read transactions would lose their
slots and the writer could reuse pages under them. py-lmdb's deallocator already skips the close
in a child, but py-lmdb also refuses to open an environment whose files an open handle in this
process still uses. That guard exists because two handles in one process share fcntl locks; an
inherited handle holds no locks in the child, so for exactly those files the guard is lifted
here, by tagging the child's identity of them with its pid.

Objects holding an environment or sockets register a method with ``on_fork_in_child``; it runs
in every forked child (while the object lives) and drops what was inherited (an environment
with ``forget_inherited``). Python's own ``os.fork`` runs the methods at once; a fork that runs
no Python hooks (uWSGI forking its workers without ``--lazy-apps``, a C extension calling
``fork()``) is found by ``check_fork``, which the client and the store call on every entry: the
first call in the child sees a new pid and runs them then.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import lmdb

try:  # py-lmdb >= 3 identifies open environments through this function
    from lmdb import _envid
except ImportError:  # older py-lmdb has no such guard
    _envid = None  # type: ignore[assignment]

_inherited: set[tuple[Any, ...]] = set()
_kept_alive: list[Any] = []
_child_hooks: dict[tuple[int, str], tuple[weakref.ref[Any], str]] = {}
"""(id of the object, method name) -> (a plain weak reference to it, the method name). Not
``weakref.WeakMethod``: at interpreter exit its internal callback may run after the
WeakMethod itself is gone and print an AttributeError ("Exception ignored in ... _cb")."""


def on_fork_in_child(method: Callable[[], None]) -> None:
    """Call the bound ``method`` in every forked child, for as long as its object lives (the
    object is held weakly)."""
    for key in [k for k, (ref, _name) in _child_hooks.items() if ref() is None]:
        del _child_hooks[key]  # objects gone since: their ids may be reused
    obj = method.__self__  # type: ignore[attr-defined]
    _child_hooks[id(obj), method.__name__] = (weakref.ref(obj), method.__name__)


_pid = os.getpid()
"""The pid the registered objects' resources belong to."""


def _run_child_hooks() -> None:
    global _pid
    _pid = os.getpid()
    for ref, name in list(_child_hooks.values()):
        obj = ref()
        if obj is not None:
            getattr(obj, name)()


def check_fork() -> None:
    """Run the child hooks if this process is a fork that has not run them (a libc fork()
    without Python's hooks). A pid comparison: cheap enough for every call."""
    if os.getpid() != _pid:
        _run_child_hooks()


os.register_at_fork(after_in_child=_run_child_hooks)


def forget_inherited(env: lmdb.Environment) -> None:
    """In a forked child: never use ``env`` again, never close it, allow reopening its files."""
    _kept_alive.append(env)  # its deallocator would be harmless, but keep it simple and inert
    if _envid is None:
        return
    try:
        path = env.path()
    except lmdb.Error:
        return
    _inherited.update(_original_env_keys(path, True))


def _no_env_keys(path: Any, subdir: bool) -> tuple[Any, ...]:  # pragma: no cover
    return ()


_original_env_keys: Callable[[Any, bool], tuple[Any, ...]] = (
    _no_env_keys if _envid is None else _envid.env_keys
)

if _envid is not None:

    def _env_keys(path: Any, subdir: bool) -> tuple[Any, ...]:
        keys = _original_env_keys(path, subdir)
        if _inherited and not _inherited.isdisjoint(keys):
            return tuple(k + ("child", os.getpid()) for k in keys)
        return keys

    _envid.env_keys = _env_keys
