#!/usr/bin/env python3
"""The tree's size and shape, counted the same way every time (issue 23's "done when"):
source files over a line budget, functions over a line budget (tests aside), and import
circles between the modules of each crate (a `use` of a name a parent re-exports counts
as a use of the module that defines it).

    python3 scripts/code_health.py [--max-file 400] [--max-fn 80] [--top 10]

Exits 1 if any crate has an import circle."""

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATES = ROOT / "crates"


def is_test_file(path: pathlib.Path) -> bool:
    return "tests" in path.parts or path.stem.endswith("tests") or path.stem == "tests"


def source_files():
    for crate in sorted(CRATES.iterdir()):
        src = crate / "src"
        if src.is_dir():
            for f in sorted(src.rglob("*.rs")):
                yield crate.name, src, f


def code_lines(text: str) -> list[str]:
    """The file's lines up to its `#[cfg(test)]` module (unit tests aside)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("#[cfg(test)]") and i + 1 < len(lines) and "mod " in lines[i + 1]:
            if "{" in lines[i + 1]:
                return lines[:i]
    return lines


FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def functions(lines: list[str]):
    """(name, first line, length) of every fn with a body, by brace depth."""
    i = 0
    while i < len(lines):
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            code = re.sub(r'"(\\.|[^"\\])*"', '""', lines[j].split("//")[0])
            code = re.sub(r"'(\\.|[^'\\])'", "''", code)
            depth += code.count("{") - code.count("}")
            started = started or "{" in code
            if started and depth <= 0:
                break
            if not started and code.rstrip().endswith(";"):
                break
            j += 1
        if started:
            yield m.group(6), i + 1, j - i + 1
        i += 1


def module_of(src: pathlib.Path, f: pathlib.Path) -> tuple[str, ...]:
    rel = f.relative_to(src).with_suffix("")
    parts = rel.parts
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def reexports(text: str) -> dict[str, str]:
    """`pub use child::{A, B}` in a parent: name -> child module."""
    out = {}
    for m in re.finditer(r"^pub use (\w+)::(\{[^}]*\}|\w+);", text, re.M):
        child, names = m.group(1), m.group(2).strip("{}")
        for n in names.split(","):
            n = n.strip().split(" as ")[-1].strip()
            if n:
                out[n] = child
    return out


def uses(text: str):
    """Every `crate::a::b::X` path in the file, braces expanded one level."""
    for m in re.finditer(r"crate::((?:\w+::)*)(\{[^}]*\}|\w+)", text):
        prefix = [p for p in m.group(1).split("::") if p]
        last = m.group(2)
        if last.startswith("{"):
            for item in last.strip("{}").split(","):
                item = item.strip()
                if item:
                    yield prefix + [p for p in item.split("::") if p and p != "self"]
        else:
            yield prefix + [last]


def circles(crate: str, files: list[tuple[pathlib.Path, pathlib.Path]]):
    mods = {}
    for src, f in files:
        mods[module_of(src, f)] = f
    texts = {m: f.read_text() for m, f in mods.items()}
    exported = {m: reexports(t) for m, t in texts.items()}
    edges = {m: set() for m in mods}
    for m, text in texts.items():
        if is_test_file(mods[m]):
            continue
        for path in uses("\n".join(code_lines(text))):
            best = ()
            for k in range(len(path), 0, -1):
                if tuple(path[:k]) in mods:
                    best = tuple(path[:k])
                    rest = path[k:]
                    break
            else:
                continue
            # A name the module only re-exports belongs to the child that defines it.
            while rest and rest[0] in exported.get(best, {}):
                child = best + (exported[best][rest[0]],)
                if child not in mods:
                    break
                best, rest = child, rest[1:]
            if best != m and best != ():
                edges[m].add(best)
    # Strongly connected components (Tarjan).
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted("::".join(c) or "crate" for c in comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return comps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-file", type=int, default=400)
    ap.add_argument("--max-fn", type=int, default=80)
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args()
    sizes, fns, by_crate = [], [], {}
    for crate, src, f in source_files():
        by_crate.setdefault(crate, []).append((src, f))
        if is_test_file(f):
            continue
        lines = code_lines(f.read_text())
        rel = f.relative_to(ROOT)
        sizes.append((len(lines), str(rel)))
        fns.extend((n, f"{rel}:{line} {name}") for name, line, n in functions(lines))
    sizes.sort(reverse=True)
    fns.sort(reverse=True)
    print(f"largest source files (lines, unit tests aside; budget {a.max_file}):")
    for n, p in sizes[: a.top]:
        print(f"  {n:5} {p}{'  OVER' if n > a.max_file else ''}")
    print(f"longest functions (lines; budget {a.max_fn}):")
    for n, p in fns[: a.top]:
        print(f"  {n:5} {p}{'  OVER' if n > a.max_fn else ''}")
    over_files = sum(n > a.max_file for n, _ in sizes)
    over_fns = sum(n > a.max_fn for n, _ in fns)
    print(f"files over {a.max_file}: {over_files}; functions over {a.max_fn}: {over_fns}")
    found = False
    for crate, files in by_crate.items():
        for comp in circles(crate, files):
            found = True
            print(f"import circle in {crate}: {' <-> '.join(comp)}")
    if not found:
        print("import circles: none")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
