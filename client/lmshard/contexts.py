"""A ZeroMQ context that a program may drop without closing: it never hangs the garbage collector.

pyzmq's ``Context.__del__`` destroys the context: it closes the sockets it tracks, then terms
it, and term waits until every socket of the context is closed. The context tracks its sockets
by weak reference. When a client that was never closed is collected as part of a reference
cycle, together with its context and sockets, the garbage collector clears those weak
references before it finalizes anything: the context's finalizer finds no socket to close, and
its term waits for sockets whose own finalizers only run after it returns. The process hung in
whatever allocation started the collection.

``OwnedContext`` closes the sockets it can still see and leaves the term to a short-lived
thread: the collection goes on, the sockets' own finalizers close them, and the term returns.
(Keeping the sockets by strong reference instead would keep sockets alive that their owners
dropped, and an explicit term of the context would then wait for them.)
"""

from __future__ import annotations

import threading

import zmq
import zmq.sugar.context as _pyzmq_context


class OwnedContext(zmq.Context):  # type: ignore[type-arg]
    """A ``zmq.Context`` whose collection never waits for its sockets (see the module doc)."""

    def __del__(self) -> None:
        if self._shadow or getattr(_pyzmq_context, "_exiting", False) or self.closed:
            return
        for sock in list(getattr(self, "_sockets", None) or ()):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        try:
            threading.Thread(target=self._term_quietly, name="lmshard-context-term",
                             daemon=True).start()
        except RuntimeError:  # the interpreter is shutting down: it ends the context itself
            pass

    def _term_quietly(self) -> None:
        try:
            self.term()
        except zmq.ZMQError:
            pass
