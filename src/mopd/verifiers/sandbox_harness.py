"""The trusted side of the sandbox: holds the tests and decides, in its own process, which ones pass.

:func:`mopd.verifiers.sandbox.run_code_tests` runs this file as ``python -I -S -B sandbox_harness.py
MEMORY_BYTES CPU_S`` (in fresh network/PID/mount namespaces when the host allows). Its first act is to fork
the worker (:mod:`mopd.verifiers.sandbox_worker`), which locks itself down (unprivileged uid, no
capabilities, Landlock, seccomp, rlimits; :mod:`mopd.verifiers.sandbox_child`) and only then waits for work.
Only after that fork does the harness read the nonce (stdin) and the tests (``payload.json``, mode 0600,
owned by root when we are root), so neither ever exists in the worker's memory.

How a test is checked
---------------------
Each test snippet is parsed. For an ``assert`` the harness evaluates the expression itself: parts that do
not depend on the solution (constants, literals, operators, a few builtins and ``math``) are evaluated here;
every other sub-expression (``add(1, 2)``, ``out``, ``sorted(f(x))``) is sent to the worker, which returns
its value as plain data, and the comparison runs here. So the expected answers never reach the worker, and
a solution that walks ``sys._getframe`` or ``gc`` finds no list of tests to replace and no answers to read.
Other statements (imports, assignments, loops, ``def check(...)`` + ``check(f)``) run in the worker, which
answers only whether they raised: such tests *can* be forged by a solution that takes over the worker.
The harness is not dumpable (``PR_SET_DUMPABLE`` 0), so even a worker with its uid cannot read its memory.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib.util
import json
import math
import operator
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_SAFE_NAMES = (
    "abs all any bool bytes chr complex dict divmod float frozenset int len list max min ord pow range "
    "repr round set sorted str sum tuple"
)
_SAFE_CALLS = {name: getattr(builtins, name) for name in _SAFE_NAMES.split(" ")}
_RECURSE_CALLS = {"abs", "round", "math.isclose", "math.fabs", "math.sqrt"}
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_CLOSED_NODES = (
    ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp, ast.BinOp, ast.BoolOp, ast.Compare,
    ast.Call, ast.keyword, ast.Name, ast.Attribute, ast.Load, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)  # fmt: skip


class WorkerGone(Exception):
    """The worker died, hung up or broke the protocol: this and every later test fail."""


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Checker:
    """Runs test snippets, asking the worker only for the values of solution-dependent expressions."""

    def __init__(self, wire, cmd_fd: int, reply_fd: int) -> None:
        self.wire, self.cmd_fd, self.reply_fd = wire, cmd_fd, reply_fd

    def ask(self, op: str, src: str) -> dict:
        try:
            self.wire.send(self.cmd_fd, {"op": op, "src": src})
            reply = self.wire.recv(self.reply_fd)
        except (OSError, EOFError, ValueError) as e:
            raise WorkerGone from e
        if not isinstance(reply, dict):
            raise WorkerGone
        return reply

    def run_test(self, src: str) -> bool:
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            return False
        for stmt in tree.body:
            if isinstance(stmt, ast.Assert):
                try:
                    if not self.value(stmt.test):
                        return False
                except WorkerGone:
                    raise
                except Exception:
                    return False
            elif self.ask("exec", ast.unparse(stmt)).get("ok") is not True:
                return False
        return True

    def value(self, node: ast.expr) -> object:
        """The value of ``node`` as Python would compute it, with the comparisons done here."""
        if _is_closed(node):
            code = compile(ast.fix_missing_locations(ast.Expression(body=node)), "<test>", "eval")
            return eval(code, {"__builtins__": dict(_SAFE_CALLS), "math": math})  # noqa: S307 - trusted test
        if isinstance(node, ast.Compare):
            left = self.value(node.left)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = self.value(comp)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.BoolOp):
            result: object = None
            for sub in node.values:
                result = self.value(sub)
                if bool(result) is isinstance(node.op, ast.Or):
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self.value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](self.value(node.left), self.value(node.right))
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and not any(
            isinstance(e, ast.Starred) for e in node.elts
        ):
            build = {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)]
            return build(self.value(e) for e in node.elts)
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values, strict=True)}
        if (
            isinstance(node, ast.Call)
            and _call_name(node.func) in _RECURSE_CALLS
            and not any(isinstance(a, ast.Starred) for a in node.args)
            and all(k.arg for k in node.keywords)
        ):
            fn = _callable(_call_name(node.func))
            args = [self.value(a) for a in node.args]
            return fn(*args, **{k.arg: self.value(k.value) for k in node.keywords})
        reply = self.ask("eval", ast.unparse(node))
        if reply.get("ok") is not True:
            raise AssertionError("the expression raised in the worker")
        try:
            return self.wire.decode(reply.get("value"))
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
            raise AssertionError("the value could not be decoded") from e


def _call_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "math":
        return "math." + func.attr
    return ""


def _callable(name: str):
    return getattr(math, name[5:]) if name.startswith("math.") else _SAFE_CALLS[name]


def _is_closed(node: ast.expr) -> bool:
    """True when ``node`` uses only literals, operators, allow-listed builtins and ``math``: no solution."""
    for sub in ast.walk(node):
        if not isinstance(sub, _CLOSED_NODES):
            return False
        if isinstance(sub, ast.Name) and sub.id not in _SAFE_CALLS and sub.id != "math":
            return False
        if isinstance(sub, ast.Attribute) and not (
            isinstance(sub.value, ast.Name) and sub.value.id == "math" and hasattr(math, sub.attr)
        ):
            return False
    return True


def main(argv: list[str]) -> None:  # pragma: no cover - runs in the sandboxed subprocess
    memory_bytes, cpu_s = int(argv[1]), int(argv[2])
    workdir = os.getcwd()
    _load("mopd_sandbox_child", "sandbox_child.py")  # the worker's lock_down, loaded before the fork
    wire = _load("mopd_sandbox_worker", "sandbox_worker.py")
    cmd_r, cmd_w = os.pipe()
    reply_r, reply_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: no secrets exist in this process yet
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            for fd in (devnull, cmd_w, reply_r):
                os.close(fd)
            wire.worker_main(cmd_r, reply_w, workdir, memory_bytes, cpu_s)
        finally:
            os._exit(5)
    os.close(cmd_r)
    os.close(reply_w)
    in_pid_namespace = os.getpid() == 1
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/<harness>/mem etc. stay closed
    nonce = sys.stdin.readline().strip()
    out_fd = os.dup(1)
    with open("payload.json", encoding="utf-8") as f:
        payload = json.load(f)
    os.unlink("payload.json")

    def report(line: str) -> None:
        os.write(out_fd, f"{nonce} {line}\n".encode())

    import resource

    with contextlib.suppress(ValueError, OSError):
        limit = max(memory_bytes, 256 << 20) + (64 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    tests: list[str] = payload["tests"]
    checker = Checker(wire, cmd_w, reply_r)
    try:
        ready = wire.recv(reply_r, 1 << 16)
        protections = dict(ready["ready"]) if isinstance(ready, dict) else {}
        protections["pidns"] = in_pid_namespace
        protections["harness_split"] = True
        report("ready " + json.dumps(protections))
        solution_ok = checker.ask("solution", payload["code"]).get("ok") is True
    except (WorkerGone, OSError, EOFError, ValueError, KeyError, TypeError):
        solution_ok = False
    gone = not solution_ok
    for i in range(len(tests)):
        ok = False
        if not gone:
            try:
                ok = checker.run_test(tests[i])
            except WorkerGone:
                gone = True
            except Exception:
                ok = False
        report(f"{i} {'PASS' if ok else 'FAIL'}")
    with contextlib.suppress(OSError):
        os.kill(pid, 9)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
