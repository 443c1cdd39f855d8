"""How the main program ended, and with which exit code, as far as an atexit handler can know.

CPython shows atexit handlers neither: when ``SystemExit`` reaches the top level, the runtime
takes the code out of the exception and clears it before finalisation runs the handlers (3.11 to
3.13 alike), and a clean end of the script leaves no trace at all. What can be known:

* The main program's module frame, if we keep a reference to it: its last instruction
  (``f_lasti``) says whether the script ran to its end (a ``RETURN``: exit code 0) or an
  exception left it. This also tells a fresh uncaught exception from a stale ``sys.last_value``
  (IPython and Jupyter leave one behind for every error they display).
* Calls seen on the way: ``sys.exit(n)`` and the ``exit(n)``/``quit(n)`` builtins, wrapped with
  their behaviour unchanged, counted only on the main thread (elsewhere they end a thread, not
  the process).
* ``raise SystemExit(n)`` in the module body: on 3.12+ a ``sys.monitoring`` CALL event on that
  one code object records its argument (every other call site reports once and is disabled, so
  a work loop in the module body pays nothing); on any version a literal ``raise SystemExit(4)``
  is read back from the bytecode.

Anything else (``raise SystemExit(code)`` inside a function on 3.11, say) is unknown, and then
the exit event carries no ``code``: a wrong 0 would tell the pipeline that a failed run passed.

Standard library only, and no use of the rest of the producer, so that its tests can load this
file into any interpreter (``dis`` and ``opcode`` are imported by ``import producers`` anyway).
"""

from __future__ import annotations

import _sitebuiltins
import builtins
import dis
import opcode
import sys
import threading
from types import FrameType
from typing import Any, Final

_NOISE: Final = frozenset({"CACHE", "PRECALL", "PUSH_NULL", "NOP", "EXTENDED_ARG"})
"""Instructions between a call's parts that differ by Python version and mean nothing here."""
_LOADS: Final = frozenset({"LOAD_NAME", "LOAD_GLOBAL"})
_TOOL_IDS: Final = (4, 3)
"""``sys.monitoring`` tool ids no standard tool claims (0-2 and 5 are debugger, coverage,
profiler and optimizer)."""

_main_frame: FrameType | None = None
_requested: int | None = None
"""Exit code of the last ``sys.exit``/``exit()``/``quit()`` call on the main thread."""
_module_raise: tuple[int, int] | None = None
"""(offset, code) of the last ``SystemExit(...)`` built in the module body (3.12+)."""
_monitoring = False
_quitters_wrapped = False


def find_main() -> None:
    """Find and keep the main program's module frame, if not known yet; any thread may call it.

    Called at ``import producers`` as well as at first use: by the first use, the main thread
    may have finished its script already (the agent's work runs in a thread).
    """
    global _main_frame
    if _main_frame is None:
        _main_frame = _find_main_frame()


def watch() -> None:
    """:func:`find_main`, then the wrappers and the 3.12+ monitor; safe to call repeatedly."""
    find_main()
    if _main_frame is not None:
        _monitor_module_calls(_main_frame)
    _wrap_quitters()


def requested(status: object) -> None:
    """Note an exit requested with ``status`` (``sys.exit``'s argument), if on the main thread."""
    global _requested
    if threading.current_thread() is threading.main_thread():
        _requested = as_exit_code(status)


def as_exit_code(status: object) -> int:
    """The process exit code Python derives from a ``SystemExit`` argument."""
    if status is None:
        return 0
    if isinstance(status, int):
        return int(status)
    return 1  # Python prints the object and exits with 1


def forget() -> None:
    """In a forked child: exits the parent requested are not the child's."""
    global _requested, _module_raise
    _requested = None
    _module_raise = None


def main_ending() -> str | None:
    """``"return"`` if the main program ran to its end, ``"raise"`` if an exception left it,
    ``None`` if its frame is unknown (an embedding application, say)."""
    frame = _main_frame
    if frame is None:
        return None
    code = frame.f_code.co_code
    lasti = frame.f_lasti
    if not 0 <= lasti < len(code):
        return None
    name = _opname(code[lasti])
    return "return" if name.startswith("RETURN_") else "raise"


def through_main(exc: BaseException) -> bool:
    """``exc`` left the main program (it is not a stale one kept from an earlier, handled error)."""
    frame = _main_frame
    if frame is None:
        return True  # nothing to tell them apart with: trust it, as Python's own sys.last_value
    if main_ending() != "raise":
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame is frame:
            return True
        tb = tb.tb_next
    return False


def exit_code() -> int | None:
    """The code the process exits with, when no exception but ``SystemExit`` ended it."""
    ending = main_ending()
    if ending == "return":
        return 0
    if ending == "raise" and _main_frame is not None:
        raised, code = _module_level_raise(_main_frame)
        if raised:
            return code
    return _requested


def _module_level_raise(frame: FrameType) -> tuple[bool, int | None]:
    """Whether the main frame ended in its own ``raise X``, and if so the exit code X gives
    (``None``: unreadable). Not a raise: an exception out of a call, a bare re-raise."""
    instructions = [ins for ins in dis.get_instructions(frame.f_code) if ins.opname not in _NOISE]
    index = next((i for i, ins in enumerate(instructions) if ins.offset == frame.f_lasti), -1)
    if index < 1 or instructions[index].opname != "RAISE_VARARGS" or instructions[index].arg != 1:
        return False, None
    before = instructions[:index]
    if before[-1].opname in _LOADS and _is_system_exit(frame, before[-1].argval):
        return True, 0  # `raise SystemExit`: the class itself, no code
    if before[-1].opname != "CALL" or before[-1].arg != 1 or len(before) < 3:
        return True, None
    if _module_raise is not None and _module_raise[0] == before[-1].offset:
        return True, _module_raise[1]
    arg, callee = before[-2], before[-3]
    if arg.opname == "LOAD_CONST" and callee.opname in _LOADS and _is_system_exit(frame, callee.argval):
        return True, as_exit_code(arg.argval)
    return True, None


def _is_system_exit(frame: FrameType, name: object) -> bool:
    if not isinstance(name, str):
        return False
    value = frame.f_globals.get(name, builtins.__dict__.get(name))
    return isinstance(value, type) and issubclass(value, SystemExit)


def _opname(op: int) -> str:
    return str(opcode.opname[op])


def _find_main_frame() -> FrameType | None:
    """The outermost module frame of ``__main__`` on the main thread: the program itself (also
    under ``python -m``, where runpy's frames sit outside it)."""
    main = threading.main_thread()
    if threading.current_thread() is main:
        frame: FrameType | None = sys._getframe()
    else:
        frame = sys._current_frames().get(main.ident or 0)
    found = None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
            found = frame
        frame = frame.f_back
    return found


def _monitor_module_calls(frame: FrameType) -> None:
    """3.12+: see ``SystemExit(...)`` built in the module body, with its argument."""
    global _monitoring
    monitoring: Any = getattr(sys, "monitoring", None)
    if monitoring is None or _monitoring:
        return
    for tool in _TOOL_IDS:
        if monitoring.get_tool(tool) is None:
            break
    else:
        return  # every spare tool id is taken: `raise SystemExit(x)` stays unknown
    missing = monitoring.MISSING
    disable = monitoring.DISABLE

    def on_call(code: object, offset: int, callee: object, arg0: object) -> object:
        global _module_raise
        try:
            if isinstance(callee, type) and issubclass(callee, SystemExit):
                _module_raise = (offset, as_exit_code(None if arg0 is missing else arg0))
                return None  # keep watching this one: it may run again after a caught exit
        except Exception:  # a callback must never raise into the program
            pass
        return disable

    try:
        monitoring.use_tool_id(tool, "agentwatch")
    except ValueError:  # claimed by another thread since get_tool(): do without
        return
    monitoring.register_callback(tool, monitoring.events.CALL, on_call)
    monitoring.set_local_events(tool, frame.f_code, monitoring.events.CALL)
    _monitoring = True


def _wrap_quitters() -> None:
    """``exit(n)``/``quit(n)``: the same objects' behaviour, plus noting ``n``."""
    global _quitters_wrapped
    if _quitters_wrapped:
        return
    _quitters_wrapped = True
    base: Any = _sitebuiltins.Quitter

    class Quitter(base):  # type: ignore[misc]
        """A ``site`` Quitter that notes the exit code (still an instance of the original class,
        so shells that look for one keep treating it as such)."""

        def __call__(self, code: object = None) -> None:
            requested(code)
            super().__call__(code)

    for name in ("exit", "quit"):
        current: Any = getattr(builtins, name, None)
        if current.__class__ is base:  # absent under `python -S`; replaced by some shells
            setattr(builtins, name, Quitter(current.name, current.eof))
