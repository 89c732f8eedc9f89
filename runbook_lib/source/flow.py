"""What the flow's source says, read from its syntax tree (nothing is imported or run).

For the entrypoint function: whether it is a Prefect flow (`@flow`, `@flow(...)`, `@prefect.flow`,
aliases resolved), its Prefect name (`name=` or the function name with "_" -> "-", as Prefect
does), its parameters and defaults. For the file: every import (module level or inside
functions), every `Secret.load("<name>")` and whether a failure to load is swallowed by a
try/except that does not re-raise, and the environment variables read. `repository_imports`
follows the repository's own modules from the entrypoint, to list every third-party import the
managed runtime will need.
"""

from __future__ import annotations

import ast
import functools
import posixpath
import re
from dataclasses import dataclass, field

from runbook_lib.core.errors import FlowSourceError

# Exceptions that catch a failed Secret.load (it raises ValueError when the block is missing).
_CATCH_ALL = {"Exception", "BaseException", "ValueError"}


@dataclass(frozen=True)
class Parameter:
    name: str
    annotation: str | None
    default: str | None  # source text of the default
    required: bool


@dataclass(frozen=True)
class Import:
    module: str  # absolute name, or ".x" for relative imports
    line: int
    level: int = 0  # relative-import level
    in_function: bool = False  # imported when a function runs, not when the module loads


@dataclass(frozen=True)
class SecretLoad:
    block: str | None  # None when the name is not a string literal
    line: int
    function: str | None  # enclosing function, None at module level
    swallowed: bool  # a try/except around it catches the failure and does not re-raise
    handler: str | None = None  # e.g. "except Exception (line 14)"


@dataclass(frozen=True)
class EnvRead:
    name: str
    line: int
    has_default: bool


@dataclass
class FlowInfo:
    path: str
    function: str
    line: int
    is_async: bool
    is_flow: bool
    flow_name: str | None  # Prefect's name for the flow
    decorators: list[str]
    parameters: list[Parameter]
    imports: list[Import] = field(default_factory=list)
    secret_loads: list[SecretLoad] = field(default_factory=list)
    env_reads: list[EnvRead] = field(default_factory=list)

    @property
    def secret_blocks(self) -> list[str]:
        return sorted({s.block for s in self.secret_loads if s.block})

    @property
    def swallowed_secret_loads(self) -> list[SecretLoad]:
        return [s for s in self.secret_loads if s.swallowed]

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)


def parse(source: str, path: str = "<flow>") -> ast.Module:
    try:
        return ast.parse(source, filename=path)
    except SyntaxError as exc:
        raise FlowSourceError(f"{path} does not parse: {exc.msg} (line {exc.lineno})") from None


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _enclosing_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.AST | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return node
    return None


class _Names:
    """How prefect's `flow` and `Secret` are spelled in this module (aliases included)."""

    def __init__(self, tree: ast.Module):
        self.flow: set[str] = set()  # dotted spellings of prefect.flow
        self.secret: set[str] = set()  # dotted spellings of prefect.blocks.system.Secret
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                for alias in node.names:
                    local = alias.asname or alias.name
                    if node.module == "prefect" and alias.name == "flow":
                        self.flow.add(local)
                    if node.module in ("prefect.blocks.system", "prefect.blocks") and alias.name == "Secret":
                        self.secret.add(local)
                    if node.module == "prefect.blocks" and alias.name == "system":
                        self.secret.add(f"{local}.Secret")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "prefect":
                        self.flow.add(f"{alias.asname or 'prefect'}.flow")
                        self.secret.add(f"{alias.asname or 'prefect'}.blocks.system.Secret")
                    if alias.name == "prefect.blocks.system":
                        self.secret.add(f"{alias.asname}.Secret" if alias.asname else "prefect.blocks.system.Secret")


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _segment(source: str, node: ast.AST) -> str:
    """The source text of `node`, as `ast.get_source_segment` gives it (else the node unparsed). That
    function splits the whole source again at every call, a character at a time in Python (~18 ms for
    the orchestrator's file): the lines are split once per source here."""
    end_line, end_col = getattr(node, "end_lineno", None), getattr(node, "end_col_offset", None)
    if end_line is None or end_col is None:
        return ast.unparse(node)
    lines, first, col = _source_lines(source), node.lineno - 1, node.col_offset
    if first == end_line - 1:
        text = lines[first].encode()[col:end_col].decode()
    else:  # offsets count UTF-8 bytes
        text = (lines[first].encode()[col:].decode() + "".join(lines[first + 1:end_line - 1])
                + lines[end_line - 1].encode()[:end_col].decode())
    return text or ast.unparse(node)


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


@functools.lru_cache(maxsize=8)
def _source_lines(source: str) -> tuple[str, ...]:
    """`source`'s lines with their ends, split as the parser splits them (on \\r\\n, \\r and \\n only)."""
    return tuple(_LINE.findall(source))


def find_function(tree: ast.Module, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    """The module-level function `name` (the last definition wins, as at import)."""
    found = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found = node
    return found


def _flow_decorator(fn: ast.AST, names: _Names) -> ast.expr | None:
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if _dotted(target) in names.flow:
            return dec
    return None


def _flow_name(fn: ast.FunctionDef | ast.AsyncFunctionDef, decorator: ast.expr | None) -> str | None:
    if decorator is None:
        return None
    if isinstance(decorator, ast.Call):
        for kw in decorator.keywords:
            if kw.arg == "name" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                return kw.value.value
            if kw.arg == "name":
                return None  # computed at import time: unknown from the syntax tree
    return fn.name.replace("_", "-")


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef, source: str) -> list[Parameter]:
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults)) + list(zip(args.kwonlyargs, args.kw_defaults))
    out = []
    for arg, default in pairs:
        out.append(Parameter(
            name=arg.arg,
            annotation=_segment(source, arg.annotation) if arg.annotation is not None else None,
            default=_segment(source, default) if default is not None else None,
            required=default is None,
        ))
    return out


def module_imports(tree: ast.Module) -> list[Import]:
    parents = _parents(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        in_fn = _enclosing_function(node, parents) is not None
        if isinstance(node, ast.Import):
            out += [Import(a.name, node.lineno, 0, in_fn) for a in node.names]
        else:  # ImportFrom
            if node.level:
                base = "." * node.level + (node.module or "")
                if node.module:
                    out.append(Import(base, node.lineno, node.level, in_fn))
                else:  # from . import a, b: each name may be a module
                    out += [Import(base + a.name, node.lineno, node.level, in_fn) for a in node.names]
            elif node.module:
                out.append(Import(node.module, node.lineno, 0, in_fn))
    return sorted(out, key=lambda i: i.line)


def _catches(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any((_dotted(t) or "").rsplit(".", 1)[-1] in _CATCH_ALL for t in types)


def _reraises(handler: ast.ExceptHandler) -> bool:
    todo = list(handler.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Raise):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))
    return False


def _swallowing_handler(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.ExceptHandler | None:
    """The innermost enclosing except clause that catches a failure of `node` and does not re-raise
    (a handler that re-raises passes the error outward; a function boundary stops the search)."""
    child = node
    while child in parents:
        parent = parents[child]
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return None
        if isinstance(parent, (ast.Try, getattr(ast, "TryStar", ast.Try))) and child in parent.body:
            handler = next((h for h in parent.handlers if _catches(h)), None)
            if handler is not None and not _reraises(handler):
                return handler
        child = parent
    return None


def _describe(handler: ast.ExceptHandler) -> str:
    kind = f"except {ast.unparse(handler.type)}" if handler.type is not None else "bare except"
    return f"{kind} (line {handler.lineno})"


def _module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "literal"` assignments (a block name is often held in one)."""
    out = {}
    for node in tree.body:
        value = getattr(node, "value", None)
        if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name):
                out[target.id] = value.value
    return out


def secret_loads(tree: ast.Module, names: _Names | None = None) -> list[SecretLoad]:
    names = names or _Names(tree)
    parents = _parents(tree)
    constants = _module_constants(tree)
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ("load", "aload") or _dotted(node.func.value) not in names.secret:
            continue
        arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
        block = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
        if isinstance(arg, ast.Name):
            block = constants.get(arg.id)
        fn = _enclosing_function(node, parents)
        handler = _swallowing_handler(node, parents)
        out.append(SecretLoad(
            block=block,
            line=node.lineno,
            function=getattr(fn, "name", None),
            swallowed=handler is not None,
            handler=_describe(handler) if handler else None,
        ))
    return sorted(out, key=lambda s: s.line)


def env_reads(tree: ast.Module) -> list[EnvRead]:
    """`os.environ["X"]`, `os.environ.get("X"[, d])`, `os.getenv("X"[, d])` with literal names."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _dotted(node.value) in ("os.environ", "environ"):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                out.append(EnvRead(key.value, node.lineno, False))
        elif isinstance(node, ast.Call) and _dotted(node.func) in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append(EnvRead(node.args[0].value, node.lineno, len(node.args) > 1 or bool(node.keywords)))
    return sorted(out, key=lambda e: e.line)


def analyse_flow(source: str, function: str, path: str = "<flow>") -> FlowInfo:
    """Analyse `function` in `source`; FlowSourceError when the file does not parse or lacks it."""
    tree = parse(source, path)
    fn = find_function(tree, function)
    if fn is None:
        defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        raise FlowSourceError(f"{path} has no module-level function {function!r} (it defines: {defined or 'none'})")
    names = _Names(tree)
    decorator = _flow_decorator(fn, names)
    return FlowInfo(
        path=path,
        function=function,
        line=fn.lineno,
        is_async=isinstance(fn, ast.AsyncFunctionDef),
        is_flow=decorator is not None,
        flow_name=_flow_name(fn, decorator),
        decorators=[_segment(source, d) for d in fn.decorator_list],
        parameters=_parameters(fn, source),
        imports=module_imports(tree),
        secret_loads=secret_loads(tree, names),
        env_reads=env_reads(tree),
    )


def analyse_entrypoint(files: dict[str, str], entrypoint: str) -> FlowInfo:
    """Analyse `path/to/file.py:function` among the repository's files (path -> text)."""
    path, _, function = entrypoint.partition(":")
    if path not in files:
        raise FlowSourceError(f"entrypoint file {path} is not in the repository")
    return analyse_flow(files[path], function, path)


# -- the repository's own modules ----------------------------------------------------------------


def _module_file(files: dict[str, str], dotted: str, base_dir: str) -> str | None:
    rel = dotted.replace(".", "/")
    for candidate in (f"{rel}.py", f"{rel}/__init__.py"):
        full = posixpath.normpath(posixpath.join(base_dir, candidate)) if base_dir else candidate
        if full in files:
            return full
    return None


def _resolve_local(files: dict[str, str], imp: Import, importer: str, entry_dir: str) -> str | None:
    """The repository file an import refers to, or None for a third-party/stdlib module.

    Absolute imports are looked up from the repository root and from the entrypoint's directory
    (Prefect puts the flow file's directory on sys.path); relative ones from the importer."""
    if imp.level:
        package = posixpath.dirname(importer)
        for _ in range(imp.level - 1):
            package = posixpath.dirname(package)
        return _module_file(files, imp.module.lstrip("."), package)
    return _module_file(files, imp.module, "") or _module_file(files, imp.module, entry_dir)


def repository_imports(files: dict[str, str], entrypoint: str) -> tuple[list[Import], list[str]]:
    """(third-party and stdlib imports reachable from the entrypoint file through the repository's
    own modules, the repository files visited). Every import of a visited file counts, including
    those inside functions: the runtime executes them."""
    entry_path = entrypoint.partition(":")[0]
    if entry_path not in files:
        raise FlowSourceError(f"entrypoint file {entry_path} is not in the repository")
    entry_dir = posixpath.dirname(entry_path)
    external: dict[str, Import] = {}
    visited: list[str] = []
    todo = [entry_path]
    while todo:
        path = todo.pop(0)
        if path in visited:
            continue
        visited.append(path)
        for imp in module_imports(parse(files[path], path)):
            local = _resolve_local(files, imp, path, entry_dir)
            if local is not None:
                todo.append(local)
                # `import pkg.mod` also runs pkg/__init__.py
                parts = local.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    init = "/".join(parts[:i]) + "/__init__.py"
                    if init in files and init not in visited:
                        todo.append(init)
            elif not imp.level:
                external.setdefault(imp.module, imp)
    return list(external.values()), visited


def local_top_level_names(files: dict[str, str], entrypoint: str) -> set[str]:
    """Top-level module names the repository itself provides (from the root and the entrypoint's
    directory), so they are not mistaken for packages to install."""
    entry_dir = posixpath.dirname(entrypoint.partition(":")[0])
    names = set()
    for path in files:
        for base in ("", entry_dir):
            if base and not path.startswith(base + "/"):
                continue
            rel = path[len(base) + 1:] if base else path
            first = rel.split("/", 1)[0]
            names.add(first[:-3] if first.endswith(".py") else first)
    return names
