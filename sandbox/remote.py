"""Judge-side stand-ins for what the program defines, and the session that talks to its process.

The trusted tests run in the judge against :class:`Remote` objects. Calling one sends the arguments to the
job process and returns what came back: a plain value decoded by :func:`sandbox.wire.load_plain`, or another
``Remote`` naming an object that stays in the job. A ``Remote`` is opaque: it compares equal only to itself,
refuses a truth value, and renders as ``<Type object>``, so no object of the program's can vote on a test.
Exceptions the program raises are re-raised here as :class:`CandidateRaised` subclasses (of the same builtin
type where safe, so ``except ValueError`` in a test still works); control-flow exceptions such as
``StopIteration`` and ``SystemExit`` are never re-raised as themselves. Expected values never leave the judge.
"""

from __future__ import annotations

import builtins
import collections
import io
import pickle
from typing import Any

from sandbox import wire
from sandbox.errors import ProtocolError, SandboxFailure

_UNSAFE_TO_RERAISE = (StopIteration, StopAsyncIteration, GeneratorExit)


class JobEnded(BaseException):
    """The job can no longer answer: ``kind`` is ``timeout``, ``exited`` or ``protocol``.

    A ``BaseException`` so that ``except Exception`` in test code cannot swallow it.
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


class PlanMismatch(BaseException):
    """The tests made a request other than the next planned one (:mod:`sandbox.plan`): run again unplanned.

    A ``BaseException`` so that ``except Exception`` in test code cannot swallow it.
    """


class CandidateRaised(Exception):
    """Base marking an exception that the program raised (as opposed to one from the tests)."""

    type_name: str
    message: str


class CandidateError(CandidateRaised):
    """A program exception with no safe builtin counterpart."""


_EXCEPTION_CLASSES: dict[str, type[BaseException]] = {}


def candidate_exception(type_name: str, message: str, builtin: bool) -> BaseException:
    """The judge-side exception for one the program raised."""
    base = getattr(builtins, type_name, None) if builtin else None
    cls: type[BaseException] = CandidateError
    if isinstance(base, type) and issubclass(base, Exception) and not issubclass(base, _UNSAFE_TO_RERAISE):
        cls = _EXCEPTION_CLASSES.get(type_name) or _EXCEPTION_CLASSES.setdefault(
            type_name, type(type_name, (base, CandidateRaised), {"__module__": "program"}))
    try:
        exc = cls(message)
    except TypeError:  # e.g. UnicodeDecodeError needs five arguments
        exc = CandidateError(message)
    exc.type_name, exc.message = type_name, message  # type: ignore[attr-defined]
    return exc


class Remote:
    """An object that lives in the job process, named by its handle."""

    __slots__ = ("_session", "_handle", "_type_name")

    def __init__(self, session: Session, handle: int, type_name: str) -> None:
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_type_name", type_name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.request("call", self, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._session.request("getattr", self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._session.request("setattr", self, name, value)

    def __bool__(self) -> bool:
        raise TypeError(f"the truth value of a {self._type_name} object from the program is not trusted")

    def __repr__(self) -> str:
        return f"<{self._type_name} object>"

    __eq__ = object.__eq__
    __hash__ = object.__hash__


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, session: Session) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._session = session

    def persistent_id(self, obj: object) -> int | None:
        if type(obj) is Remote:
            if obj._session is not self._session:
                raise TypeError("object belongs to another job")
            return obj._handle
        return None


class Session:
    """The judge's conversation with one job process, bounded by the job's deadline."""

    def __init__(self, channel: wire.DeadlineChannel, deadline: float) -> None:
        self._channel = channel
        self.deadline = deadline
        self.ended: JobEnded | None = None
        self.last_call: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._planned: collections.deque[bytes] = collections.deque()  # answered ahead, not yet asked
        self.off_plan = False
        self._buffer = io.BytesIO()
        self._pickler = _Pickler(self._buffer, self)  # one per session: a request is pickled per test

    def load(self, program: bytes | str, names: tuple[str, ...], planned: tuple[bytes, ...] = ()
             ) -> dict[str, Any]:
        """Have the job load the program (marshalled code or source: :mod:`sandbox.program`), then answer the
        ``planned`` requests ahead; return stand-ins for those of ``names`` it defines.

        Raises ``CandidateRaised`` if loading raised, ``JobEnded`` if the job stopped answering, and
        ``SandboxFailure`` if the job process never came up.
        """
        self._send(pickle.dumps(("load", program, names, planned), protocol=pickle.HIGHEST_PROTOCOL))
        self._planned = collections.deque(planned)
        try:
            started = self._receive()
        except JobEnded as exc:
            raise SandboxFailure(f"job process did not start ({exc.kind})") from None
        if started != ("started",):
            raise SandboxFailure("job process did not start")
        reply = self._receive()
        if reply[0] == "load_error" and len(reply) == 3:
            raise candidate_exception(*_strings(reply[1:]), builtin=True)
        if reply[0] != "ready" or type(reply[1]) is not dict:
            raise self._end(JobEnded("protocol", "malformed load reply"))
        return {name: self._stand_in(desc) for name, desc in reply[1].items() if name in names}

    def request(self, op: str, target: Remote, *payload: Any) -> Any:
        """Run ``op`` on ``target`` in the job and return the stand-in for its answer."""
        if self.ended is not None:
            raise self.ended
        self._buffer.seek(0)
        self._buffer.truncate()
        self._pickler.clear_memo()
        try:
            self._pickler.dump((op, target._handle, *payload))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(f"cannot pass this value to the program: {exc}") from None
        request = self._buffer.getvalue()
        if self.off_plan:
            raise PlanMismatch()
        if not self._planned:
            self._send(request)
        elif request != self._planned.popleft():
            self.off_plan = True  # for good: the job's answers no longer line up with the requests
            raise PlanMismatch()
        reply = self._receive()
        if reply[0] == "raise" and len(reply) == 4:
            raise candidate_exception(*_strings(reply[1:3]), builtin=reply[3] is True)
        result = self._stand_in(reply)
        if op == "call":
            self.last_call = (payload[0], payload[1], result)
        return result

    def _stand_in(self, desc: object) -> Any:
        if type(desc) is tuple and len(desc) == 2 and desc[0] == "value":
            return desc[1]
        if (type(desc) is tuple and len(desc) == 3 and desc[0] == "ref" and type(desc[1]) is int
                and type(desc[2]) is str):
            return Remote(self, desc[1], desc[2])
        raise self._end(JobEnded("protocol", "malformed reply"))

    def _send(self, payload: bytes) -> None:
        try:
            self._channel.send(payload, self.deadline)
        except wire.JobTimeout:
            raise self._end(JobEnded("timeout")) from None
        except OSError:
            raise self._end(JobEnded("exited")) from None

    def _receive(self) -> tuple[Any, ...]:
        if self.ended is not None:
            raise self.ended
        try:
            data = self._channel.recv(self.deadline)
            if data is None:
                raise self._end(JobEnded("exited"))
            message = wire.load_plain(data)
        except wire.JobTimeout:
            raise self._end(JobEnded("timeout")) from None
        except ProtocolError as exc:
            raise self._end(JobEnded("protocol", str(exc))) from None
        if type(message) is not tuple or not message:
            raise self._end(JobEnded("protocol", "reply is not a message"))
        return message

    def _end(self, ended: JobEnded) -> JobEnded:
        self.ended = self.ended or ended
        return self.ended


def _strings(values: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(v if type(v) is str else "" for v in values)
