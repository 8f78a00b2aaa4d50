#!/usr/bin/env python3
"""Fail when the top-level modules of a crate import each other in a circle.

ARCHITECTURE.md promises a house without import circles: within each crate, the modules
directly under src/ (a file or a folder) form a graph by their `crate::<module>` paths
(outside comments and #[cfg(test)] code), and that graph must have no cycle. A module's
own children may use their parent, as Rust intends. Run by `make lint`.
"""
import pathlib
import re
import sys

CRATES = ["api", "common", "operator", "node-vmm", "e2e"]


def edges(src: pathlib.Path) -> dict:
    out: dict = {}
    for f in src.rglob("*.rs"):
        top = f.relative_to(src).parts[0].removesuffix(".rs")
        if top in ("lib", "main", "bin"):
            continue
        text = f.read_text()
        text = text.split("#[cfg(test)]", 1)[0]
        code = "\n".join(l for l in text.splitlines() if not l.strip().startswith("//"))
        for m in re.findall(r"crate::([a-z_0-9]+)", code):
            if m != top:
                out.setdefault(top, set()).add(m)
    return out


def cycle(graph: dict):
    state: dict = {}

    def visit(n, path):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                c = visit(m, path + [m])
                if c:
                    return c
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n, [n])
            if c:
                return c
    return None


def main() -> int:
    root = pathlib.Path(__file__).resolve().parent.parent
    bad = 0
    for crate in CRATES:
        c = cycle(edges(root / crate / "src"))
        if c:
            print(f"{crate}: modules import each other in a circle: {' -> '.join(c)}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
