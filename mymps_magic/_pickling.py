"""Functions sent by value: their pickles, kept while nothing they captured can have changed,
the user's own modules they need, and their source lines, put back into remote tracebacks.

cloudpickle rebuilds a notebook function from scratch on every call, and on a quick call that is
a good part of the client's time. A function whose pickle depends only on things that cannot
change in place (its code, defaults and name; globals and closure cells holding numbers,
strings, modules, or importable classes and functions) is pickled once and reused for as long
as each of those is still the very same object. Anything else (a global list, an array, another
notebook function) is pickled afresh every time, so a call always sees the current values.
"""

from __future__ import annotations

import itertools
import linecache
import re
import sys
import sysconfig
from collections.abc import Callable, Collection
from pathlib import Path
from types import BuiltinFunctionType, FunctionType, ModuleType
from typing import Any, NamedTuple

from mymps_magic import errors, wire

_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_MAX_ENTRIES = 256
_MISSING = object()


class _Entry:
    __slots__ = ("imports", "names", "pickled", "state")

    def __init__(self, names: tuple[str, ...], state: list[Any], imports: tuple[int, int], pickled: bytes) -> None:
        self.names = names
        self.state = state
        self.imports = imports
        self.pickled = pickled


class PickledFunctions:
    """The pickle stream of each cacheable function seen, checked against it on every use."""

    def __init__(self) -> None:
        self._entries: dict[FunctionType, _Entry] = {}

    def lookup(self, fn: Any) -> bytes | None:
        """``fn``'s pickle stream if it was made before and is still valid."""
        entry = self._entries.get(fn) if type(fn) is FunctionType else None
        if entry is None:
            return None
        state = _state(fn, entry.names)
        if (state is not None and _imports() == entry.imports and len(state) == len(entry.state)
                and all(a is b for a, b in zip(state, entry.state, strict=True))):
            return entry.pickled
        return None

    def fill(self, fn: Any) -> bytes | None:
        """Pickle ``fn`` and keep the stream, or None when it cannot be reused: then the caller
        pickles it along with its arguments, as always. Register the modules to pickle by
        value first: that changes the stream."""
        if type(fn) is not FunctionType:
            return None
        names = tuple(wire.global_names(fn.__code__))
        state = _state(fn, names)
        if state is None or not all(_stable(value) for value in state[_FIXED:]):
            self._entries.pop(fn, None)
            return None
        buffers = wire.dumps(fn)
        if len(buffers) != 1:  # array memory out of band: not a plain stream
            return None
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        pickled = bytes(buffers[0])
        self._entries[fn] = _Entry(names, state, _imports(), pickled)
        return pickled


_FIXED = 6
"""Items of `_state` that are the function's own attributes; the rest are captured values."""


def _state(fn: FunctionType, names: tuple[str, ...]) -> list[Any] | None:
    """Everything ``fn``'s pickle depends on, as objects compared by identity; None when a
    closure cell is empty or the function carries attributes of its own."""
    if fn.__dict__ or fn.__kwdefaults__:
        return None
    globals_ = fn.__globals__
    state: list[Any] = [fn.__code__, fn.__defaults__, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__]
    state += [globals_.get(name, _MISSING) for name in names]
    for cell in fn.__closure__ or ():
        try:
            state.append(cell.cell_contents)
        except ValueError:
            return None
    state += fn.__defaults__ or ()
    return state


def _imports() -> tuple[int, int]:
    """Modules imported, and modules registered for pickling by value: when either count moves,
    a function may pickle differently (its submodules, or by value instead of by reference)."""
    return len(sys.modules), len(cloudpickle_internals().by_value_modules)


class CloudpickleInternals(NamedTuple):
    """What the cache needs to know of cloudpickle that cloudpickle keeps private."""

    by_value_modules: Collection[str]
    """Names of the modules ``cloudpickle.register_pickle_by_value`` registered."""
    pickled_by_reference: Callable[[Any], bool]
    """Whether cloudpickle pickles a class or function by reference (its import path)."""


def cloudpickle_internals() -> CloudpickleInternals:
    """The only place that reaches into cloudpickle's private names.

    Checked against cloudpickle 3.1.3; ``tests/test_cloudpickle_contract.py`` fails when a
    release renames them or changes what they mean. Should they vanish, nothing breaks: no
    module counts as registered and nothing counts as pickled by reference, so no function is
    cached and every call is pickled afresh.
    """
    import cloudpickle

    module = cloudpickle.cloudpickle
    return CloudpickleInternals(
        by_value_modules=getattr(module, "_PICKLE_BY_VALUE_MODULES", ()),
        pickled_by_reference=getattr(module, "_should_pickle_by_reference", lambda obj: False),
    )


def _stable(value: Any) -> bool:
    """True for what cannot change without becoming another object (then the identity check
    notices): numbers, strings, modules, and classes and functions pickled by reference."""
    if value is _MISSING or isinstance(value, (_SCALARS, ModuleType)):
        return True
    if isinstance(value, BuiltinFunctionType):  # `len`, `math.sqrt`; not `some_list.append`
        return value.__self__ is None or isinstance(value.__self__, ModuleType)
    if type(value) in (tuple, frozenset):
        return all(_stable(item) for item in value)
    if isinstance(value, (type, FunctionType)):
        return bool(cloudpickle_internals().pickled_by_reference(value))
    return False


# -- requests ----------------------------------------------------------------------------------

_FUNCTIONS = PickledFunctions()


def pickle_call(fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """The fields and buffers of a ``run`` request: the function's own pickle stream, reused
    while valid, and the arguments' buffers; or, for a function that cannot be kept, all
    three pickled together.

    Raises:
        PicklingError: ``fn`` or an argument cannot be pickled.
    """
    try:
        pickled = _FUNCTIONS.lookup(fn)
        if pickled is None:
            _send_local_modules_by_value(fn)
            pickled = _FUNCTIONS.fill(fn)
        if args or kwargs:
            _send_local_modules_by_value(*args, *kwargs.values())
        if pickled is not None:
            return {"fn": pickled}, wire.dumps((args, kwargs))
        return {}, wire.dumps((fn, args, kwargs))
    except Exception as exc:
        raise errors.PicklingError(
            f"Cannot send {getattr(fn, '__name__', fn)!r} or its arguments: {type(exc).__name__}: {exc}. "
            "Send plain data (numbers, lists, arrays, tensors) or write the code in a %%mymps cell"
        ) from None


def pickle_values(values: dict[str, Any]) -> list[Any]:
    """The buffers of a ``push`` request.

    Raises:
        PicklingError: a value cannot be pickled; the message names each one that cannot.
    """
    _send_local_modules_by_value(*values.values())
    try:
        return wire.dumps(values)
    except Exception as exc:
        bad = [name for name, v in values.items() if not _picklable(v)]
        raise errors.PicklingError(
            f"Cannot push {', '.join(map(repr, bad)) or 'the values'}: {type(exc).__name__}: {exc}. "
            "Push plain data (numbers, lists, arrays, tensors) or build the object remotely in a %%mymps cell"
        ) from None


def _picklable(value: Any) -> bool:
    try:
        wire.dumps(value)
    except Exception:
        return False
    return True


# -- the user's own modules ---------------------------------------------------------------------

_INSTALLED = tuple(
    str(Path(p).resolve()) for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))
)


def _is_local(module: ModuleType | None) -> bool:
    """A module of the user's own (not installed, not the standard library), which the server
    cannot be expected to import: it must travel by value."""
    if module is None or module.__name__ in ("__main__", "builtins") or module.__name__.startswith("mymps_magic"):
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    return not str(Path(file).resolve()).startswith(_INSTALLED)


_SCAN_LIMIT = 1000
"""Items of a container looked at for local classes: enough for real data, bounded for huge lists."""


def _send_local_modules_by_value(*objs: Any) -> None:
    """Register the user's own modules that these objects (and the functions they call) come from
    with cloudpickle's pickle-by-value, so the server needs no copy of them."""
    import cloudpickle

    seen: set[int] = set()
    todo = list(objs)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        module = obj if isinstance(obj, ModuleType) else sys.modules.get(getattr(obj, "__module__", None) or "")
        if module is None and not isinstance(obj, FunctionType):
            module = sys.modules.get(type(obj).__module__)
        if _is_local(module):
            assert module is not None
            top = sys.modules.get(module.__name__.split(".")[0], module)
            try:
                cloudpickle.register_pickle_by_value(top)
            except ValueError:
                cloudpickle.register_pickle_by_value(module)
        if isinstance(obj, FunctionType):
            # The names of nested code too (comprehensions, lambdas, inner functions): the same
            # walk that the pickle cache and the traceback sources use.
            names = wire.global_names(obj.__code__)
            todo.extend(obj.__globals__[n] for n in names if n in obj.__globals__)
            todo.extend(cell.cell_contents for cell in obj.__closure__ or () if filled(cell))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(itertools.islice(obj, _SCAN_LIMIT))  # instances of local classes inside
        elif isinstance(obj, dict):
            todo.extend(itertools.islice(obj.values(), _SCAN_LIMIT))


# -- tracebacks ---------------------------------------------------------------------------------

_DYNAMIC_FRAME = re.compile(r'^  File "<dynamic-code>", line (\d+), in (.+)\n$')
_WALK_LIMIT = 500


def fill_sources(traceback: list[str], fn: Any) -> list[str]:
    """``traceback`` with the frames of code sent by value given their file and source line.

    cloudpickle sends code without its file (the server shows ``"<dynamic-code>"`` and no
    source), but this side has both: the frame is matched by function name and line against
    ``fn`` and the functions and classes it reaches through its globals and closure.
    """
    codes: dict[str, list[Any]] = {}
    for code in _codes_reached(fn):
        codes.setdefault(code.co_name, []).append(code)
    out = []
    for chunk in traceback:
        match = _DYNAMIC_FRAME.match(chunk)
        candidates = codes.get(match.group(2), []) if match else []
        line = int(match.group(1)) if match else 0
        before = [code for code in candidates if code.co_firstlineno <= line]
        if not before:
            out.append(chunk)
            continue
        code = max(before, key=lambda c: c.co_firstlineno)
        source = linecache.getline(code.co_filename, line).strip()
        where = f'  File "{code.co_filename}", line {line}, in {code.co_name}\n'
        out.append(where + (f"    {source}\n" if source else ""))
    return out


def _codes_reached(fn: Any) -> list[Any]:
    """Code objects of ``fn``, of what it defines, and of the functions and classes it reaches."""
    codes: list[Any] = []
    seen: set[int] = set()
    todo = [fn]
    while todo and len(seen) < _WALK_LIMIT:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, FunctionType):
            todo.append(obj.__code__)
            todo.extend(obj.__globals__[n] for n in wire.global_names(obj.__code__) if n in obj.__globals__)
            todo.extend(cell.cell_contents for cell in obj.__closure__ or () if filled(cell))
        elif isinstance(obj, type):  # a class's methods
            todo.extend(value for value in vars(obj).values()
                        if isinstance(value, (FunctionType, staticmethod, classmethod, property)))
        elif isinstance(obj, (staticmethod, classmethod)):
            todo.append(obj.__func__)
        elif isinstance(obj, property):
            todo.extend(f for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif hasattr(obj, "co_consts"):
            codes.append(obj)
            todo.extend(const for const in obj.co_consts if hasattr(const, "co_consts"))
    return codes


def filled(cell: Any) -> bool:
    """Whether a closure cell holds a value yet."""
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True
