"""The house rules a reader relies on: no import cycles among the project's modules (imports inside functions count),
every Markdown file the code cites exists in the repository, and every module's docstring names only commands that
exist."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in MODULES}
    return found - {path.stem}


def test_no_import_cycles_among_project_modules():
    graph = {name: project_imports(path) for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep])
            if dep not in state:
                visit(dep, trail + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_cited_markdown_files_are_in_the_repository():
    cited = set()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]:
        cited |= {(path.name, m) for m in re.findall(r"([\w/.-]+\.md) §", path.read_text())}
    missing = sorted((source, doc) for source, doc in cited if not (ROOT / doc).is_file())
    assert not missing, f"cited but not in the repository: {missing}"


def docstring_commands() -> list[tuple[str, str, str, list[str]]]:
    """(module, script, subcommand, flags) for every `python SCRIPT.py ...` line of a module docstring."""
    commands = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        for line in doc.splitlines():
            match = re.search(r"python ([\w/]+\.py)((?: [\w-]+)?)(.*)", line)
            if match and "torchrun" not in line:
                script, sub, rest = match.groups()
                sub = sub.strip() if sub.strip() and not sub.strip().startswith("-") else ""
                commands.append((path.name, script, sub, re.findall(r"(--[a-z][\w-]*)", rest)))
    return commands


def test_docstring_commands_run_with_flags_that_exist():
    """Every `python X.py [subcommand] --flag ...` a module docstring shows names a script with a command line and
    flags its --help lists (stale commands and flags were the commonest docstring rot)."""
    import subprocess
    import sys
    helps: dict[tuple[str, str], str] = {}
    for module, script, sub, flags in docstring_commands():
        key = (script, sub if sub in SUBCOMMANDS.get(script, ()) else "")
        if key not in helps:
            path = ROOT / script if (ROOT / script).is_file() else ROOT / "bench" / Path(script).name
            assert path.is_file(), f"{module} names {script}, which does not exist"
            proc = subprocess.run([sys.executable, str(path), *([key[1]] if key[1] else []), "--help"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{module}: `python {script} {key[1]} --help` fails: {proc.stderr[-500:]}"
            helps[key] = proc.stdout
        for flag in flags:
            assert flag in helps[key], f"{module} shows `python {script} {key[1]} {flag}`, which --help does not list"


# scripts whose first argument may be a subcommand with its own flags
SUBCOMMANDS = {"eval.py": ("prepare", "ablation-report", "demo-summary"),
               "bench/vllm_bench.py": ("loop", "sync", "decode"), "video_context.py": ("info",)}
