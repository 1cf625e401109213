"""Custom import-linter contracts of the house rules (DESIGN.md, Layout) that the built-in types cannot say:

- `clients_only`: a service package imports another service package only through its `client` module;
- `acyclic`: no import cycle among the modules of the given packages;
- `no_module_strings`: the given packages name none of the forbidden packages' modules in a string either
  (`importlib.import_module("services.x")` would hide an import from the graph).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from importlinter import Contract, ContractCheck, fields, output


def _package_of(module: str, packages: list[str]) -> str | None:
    for pkg in packages:
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


class ClientsOnlyContract(Contract):
    """`services`: the packages whose cross-imports are checked; `aggregators`: packages allowed to import any
    service module (the stack); `client_module`: the one module name a service may import of another."""

    type_name = "clients_only"
    services = fields.ListField(subfield=fields.StringField())
    aggregators = fields.ListField(subfield=fields.StringField(), required=False)
    client_module = fields.StringField(required=False)

    def check(self, graph, verbose: bool) -> ContractCheck:  # type: ignore[no-untyped-def]
        services = [str(s) for s in self.services]  # type: ignore[attr-defined]
        aggregators = [str(s) for s in (self.aggregators or [])]  # type: ignore[attr-defined]
        client = str(self.client_module or "client")  # type: ignore[attr-defined]
        bad = []
        for importer in sorted(graph.modules):
            src = _package_of(importer, services)
            if src is None or _package_of(importer, aggregators):
                continue
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                dst = _package_of(imported, services)
                if dst is None or dst == src:
                    continue
                if imported != f"{dst}.{client}":
                    details = graph.get_import_details(importer=importer, imported=imported)
                    lines = ", ".join(str(d["line_number"]) for d in details) or "?"
                    bad.append(f"{importer} -> {imported} (line {lines}): use {dst}.{client}")
        return ContractCheck(kept=not bad, metadata={"bad": bad})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["bad"]:
            output.print_error(line)
            output.new_line()


class AcyclicContract(Contract):
    """`packages`: no cycle of direct imports among their modules."""

    type_name = "acyclic"
    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:  # type: ignore[no-untyped-def]
        packages = [str(p) for p in self.packages]  # type: ignore[attr-defined]
        nodes = sorted(m for m in graph.modules if _package_of(m, packages))
        edges = {
            m: sorted(i for i in graph.find_modules_directly_imported_by(m) if _package_of(i, packages)) for m in nodes
        }
        cycles = [c for c in _strongly_connected(nodes, edges) if len(c) > 1]
        return ContractCheck(kept=not cycles, metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error("import cycle: " + " <-> ".join(cycle))
            output.new_line()


def _strongly_connected(nodes: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the graph has thousands of modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for j in range(i, len(edges.get(node, []))):
                nxt = edges[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return out


class NoModuleStringsContract(Contract):
    """`source_packages` contain no string literal naming a module of `forbidden_packages`."""

    type_name = "no_module_strings"
    source_packages = fields.ListField(subfield=fields.StringField())
    forbidden_packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:  # type: ignore[no-untyped-def]
        forbidden = [str(p) for p in self.forbidden_packages]  # type: ignore[attr-defined]
        names = "|".join(map(re.escape, forbidden))
        pattern = re.compile(rf"^({names})(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_]\w*)?$")
        bad = []
        for module in sorted(graph.modules):
            if not _package_of(module, [str(p) for p in self.source_packages]):  # type: ignore[attr-defined]
                continue
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.match(node.value.strip()):
                    bad.append(f"{module}:{node.lineno} names {node.value.strip()!r}")
        return ContractCheck(kept=not bad, metadata={"bad": bad})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["bad"]:
            output.print_error(line)
            output.new_line()
