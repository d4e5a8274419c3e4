"""Server rules: what a serialized request makes NDIF import, checked without running it.

Code that runs inside a trace may import only :data:`PERMITTED_MODULES`; the request itself
references nnsight's own runtime (:data:`RUNTIME_MODULES`). NDIF 0.1.2 itself keeps no import
whitelist (untrusted code runs in a sandbox process), but older deployments did; a request that
passes this audit runs on both.
"""

from __future__ import annotations

import ast
import pickletools
from dataclasses import dataclass
from typing import Sequence

# What code running inside a trace may import on NDIF (all in NDIF's execution whitelist;
# ``_operator`` is the C half of ``operator``).
PERMITTED_MODULES = ("torch", "numpy", "math", "einops", "collections", "typing", "operator",
                     "_operator")
# What nnsight's own request format needs to be rebuilt, whatever the trace does. Every entry is
# in NDIF's deserialization whitelist: ``builtins`` and ``copyreg`` (pickle's reconstructors),
# ``cloudpickle`` (classes and modules shipped by value), and the nnsight modules a request names:
# the tracer and its frame stand-in, the source-based function loader, the envoys of the model,
# and ``nnsight.intervention.interleaver`` (``nnsight_internals.current_batch_group`` reads the
# running ``Mediator``; NDIF lists that module for deserialization, and it is resolved there,
# not imported by the trace). ``_codecs`` is not needed: requests use pickle protocol 4.
RUNTIME_MODULES = ("builtins", "copyreg", "cloudpickle", "nnsight.tracing",
                   "nnsight.intervention.serialization", "nnsight.intervention.envoy",
                   "nnsight.intervention.interleaver", "nnsight.modeling")


@dataclass
class RequestAudit:
    """What a serialized request makes the server import.

    Attributes:
        globals: ``(module, name)`` of every class/function the payload references by name
            (pickle ``GLOBAL``/``STACK_GLOBAL``) and every module it rebuilds (cloudpickle's
            ``subimport``, as ``(module, "<module>")``).
        imports: modules named by ``import`` statements in the source it ships.
        violations: references outside :data:`PERMITTED_MODULES` and :data:`RUNTIME_MODULES`.
    """

    globals: set
    imports: set
    violations: list


def _allowed(module: str, allowed: Sequence[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def audit_request(blob: bytes, compress: bool = False,
                  permitted: Sequence[str] = PERMITTED_MODULES,
                  runtime: Sequence[str] = RUNTIME_MODULES) -> RequestAudit:
    """Check a serialized request against the server's import rules, without running it.

    Walks the pickle opcodes (tracking the strings pushed and memoized, so ``STACK_GLOBAL``
    resolves to its module and name) and parses every shipped string that is Python source
    for ``import`` statements. Classes and functions pickled by value are fine: only what the
    server must import is checked.
    """
    if compress:
        import zstandard

        blob = zstandard.ZstdDecompressor().decompress(blob)
    mark = object()
    stack: list = []
    memo: dict = {}
    refs: set = set()
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(blob):
        name = op.name
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                    "SHORT_BINSTRING", "BINSTRING", "STRING"):
            stack.append(arg)
            strings.append(arg)
        elif name == "MARK":
            stack.append(mark)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "GLOBAL":
            module, qualname = arg.split(" ", 1)
            refs.add((module, qualname))
            stack.append((module, qualname))
        elif name == "STACK_GLOBAL":
            qualname = stack.pop()
            module = stack.pop()
            refs.add((module, qualname))
            stack.append((module, qualname))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "TUPLE":
            start = len(stack) - 1 - stack[::-1].index(mark)
            items = tuple(stack[start + 1:])
            del stack[start:]
            stack.append(items)
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "REDUCE":
            args = stack.pop()
            func = stack.pop()
            # cloudpickle rebuilds a module reference as subimport(name)
            if (isinstance(func, tuple) and len(func) == 2 and func[1] == "subimport"
                    and isinstance(args, tuple) and args and isinstance(args[0], str)):
                refs.add((args[0], "<module>"))
            stack.append(None)
        elif name == "POP" and stack and stack[-1] is mark:
            stack.pop()
        elif pickletools.markobject in op.stack_before:
            start = len(stack) - 1 - stack[::-1].index(mark)
            del stack[start:]
            extra = len(op.stack_before) - 2  # items below the mark (e.g. the list of APPENDS)
            if extra:
                del stack[-extra:]
            stack.extend([None] * len(op.stack_after))
        else:
            if op.stack_before:
                del stack[-len(op.stack_before):]
            stack.extend([None] * len(op.stack_after))
    imports: set = set()
    for text in strings:
        if "import" not in text:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imports.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imports.add("." * node.level + (node.module or ""))
    violations = sorted(f"{m}.{n}" for m, n in refs
                        if not _allowed(m, tuple(permitted) + tuple(runtime)))
    violations += sorted(f"import {m}" for m in imports if not _allowed(m, permitted))
    return RequestAudit(refs, imports, violations)
