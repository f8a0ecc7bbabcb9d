#!/usr/bin/env python
"""Structure checks of the megakd package (run by tests/test_structure.py; also a report).

* the largest import cycle between megakd modules (module-level and function-level imports);
* function-level imports of megakd modules, each of which needs a comment saying why
  (``# why: ...`` on its line or the line above: an optional heavy dependency);
* modules over 500 lines, and functions over 80 lines without a ``# long: ...`` comment on
  the line above the ``def`` or on the first line of its body.

    python tools/check_structure.py [--root .]     # prints the report; exit 1 on violations
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


@dataclass
class Report:
    modules: int = 0
    largest_cycle: List[str] = field(default_factory=list)
    function_imports: List[str] = field(default_factory=list)  # every one, "path:line"
    unexplained_function_imports: List[str] = field(default_factory=list)
    largest_module: Tuple[int, str] = (0, "")
    largest_function: Tuple[int, str] = (0, "")
    long_modules: List[str] = field(default_factory=list)
    long_functions: List[str] = field(default_factory=list)

    @property
    def violations(self) -> List[str]:
        out = [f"import cycle: {' -> '.join(self.largest_cycle)}"] if self.largest_cycle else []
        out += [f"{where}: function-level import of megakd without a '# why:' comment"
                for where in self.unexplained_function_imports]
        out += [f"{name}: over {MAX_MODULE_LINES} lines" for name in self.long_modules]
        out += [f"{name}: over {MAX_FUNCTION_LINES} lines without a '# long:' comment"
                for name in self.long_functions]
        return out


def _modules(root: str) -> Dict[str, str]:
    found = {}
    for dirpath, _, files in os.walk(os.path.join(root, "megakd")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _targets(module: str, node: ast.AST, is_package: bool, known: Set[str]) -> List[str]:
    """megakd modules an import statement names (``from a import b`` -> ``a.b`` if a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                 for alias in node.names]
    out = []
    for name in names:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in known and name != module:
            out.append(name)
    return out


def _has_comment(lines: List[str], lineno: int, marker: str) -> bool:
    """``marker`` in a comment on line ``lineno`` (1-based) or the line above."""
    return any(marker in lines[i] for i in (lineno - 1, lineno - 2) if 0 <= i < len(lines))


def _largest_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    best: List[str] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        nonlocal best
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 and len(component) > len(best):
                best = sorted(component)

    for node in list(graph):
        if node not in index:
            visit(node)
    return best


def analyse(root: str) -> Report:
    sys.setrecursionlimit(10000)
    modules = _modules(root)
    report = Report(modules=len(modules))
    graph: Dict[str, Set[str]] = defaultdict(set)
    for module, path in sorted(modules.items()):
        source = open(path, encoding="utf-8").read()
        lines = source.splitlines()
        report.largest_module = max(report.largest_module, (len(lines), module))
        if len(lines) > MAX_MODULE_LINES:
            report.long_modules.append(f"{path} ({len(lines)})")
        tree = ast.parse(source)
        is_package = path.endswith("__init__.py")
        graph[module]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(_targets(module, node, is_package, set(modules)))
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            name = f"{module}.{node.name}"
            report.largest_function = max(report.largest_function, (length, name))
            first_body = node.body[0].lineno if node.body else node.lineno
            if length > MAX_FUNCTION_LINES and not (
                    _has_comment(lines, node.lineno, "# long:")
                    or any("# long:" in lines[i - 1] for i in range(node.lineno, first_body + 1))):
                report.long_functions.append(f"{path}:{node.lineno} {name} ({length})")
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and \
                        _targets(module, inner, is_package, set(modules)):
                    where = f"{path}:{inner.lineno}"
                    report.function_imports.append(where)
                    if not _has_comment(lines, inner.lineno, "# why:"):
                        report.unexplained_function_imports.append(where)
    report.largest_cycle = _largest_cycle(graph)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args(argv)
    report = analyse(args.root)
    print(f"modules: {report.modules}")
    print(f"largest import cycle: {len(report.largest_cycle)} modules")
    print(f"function-level imports of megakd modules: {len(report.function_imports)}")
    print(f"largest module: {report.largest_module[1]} ({report.largest_module[0]} lines)")
    print(f"largest function: {report.largest_function[1]} ({report.largest_function[0]} lines)")
    for violation in report.violations:
        print(f"violation: {violation}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
