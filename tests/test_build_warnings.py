"""The kernel sources compile warning-free under ``cython -Wextra`` (with setup.py's directives),
but for one false positive Cython makes itself: the dispatcher it generates for a fused-type
``def`` function reads a local ``arg`` that its flow analysis thinks may be unset
(Cython/Compiler/FusedNode.py, ``_unpack_argument``; cython/cython#1269 and its kin), reported at
column 0 of the ``def`` line."""
import ast
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("Cython", reason="the Cython compiler is not installed")

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU = REPO / "roialign_cy" / "_cpu"
# the *_x86_64_v3.pyx shims only include these
SOURCES = ["_roi_align.pyx", "_roi_align_rotated.pyx", "_roi_pool.pyx", "_checks.pyx",
           "_openmp.pyx"]
WARNING = re.compile(r"^warning: (?P<path>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$")
DISPATCH_MSG = "local variable 'arg' might be referenced before assignment"
# Cython's own fused types (``from cython cimport floating``); the package's are found by grep
BUILTIN_FUSED = {"floating", "integral", "numeric"}


def _setup_directives():
    """setup.py's ``compiler_directives``, read from its source (running it would build)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "compiler_directives":
            return ast.literal_eval(node.value)
    pytest.fail("setup.py no longer passes compiler_directives to cythonize")


def _fused_names():
    names = set(BUILTIN_FUSED)
    for path in list(CPU.glob("*.pyx")) + list(CPU.glob("*.pxd")):
        names.update(re.findall(r"^\s*ctypedef\s+fused\s+(\w+)", path.read_text(), re.M))
    return names


def _def_signature(lines, i):
    """The header of the ``def`` at lines[i] (0-based), through its closing parenthesis."""
    text = ""
    for line in lines[i:]:
        text += line + "\n"
        if text.count("(") and text.count("(") == text.count(")"):
            return text
    return text


def _is_fused_dispatch(w, fused):
    """Whether warning w is the fused dispatcher's: about 'arg', at column 0 of a ``def`` line
    whose signature uses a fused type."""
    if w["msg"] != DISPATCH_MSG or w["col"] != "0":
        return False
    path = pathlib.Path(w["path"])
    lines = (path if path.is_absolute() else REPO / path).read_text().splitlines()
    i = int(w["line"]) - 1
    if not 0 <= i < len(lines) or not lines[i].startswith("def "):
        return False
    return bool(fused & set(re.findall(r"\w+", _def_signature(lines, i))))


@pytest.mark.parametrize("name", SOURCES)
def test_cython_wextra_clean(name, tmp_path):
    directives = ",".join(f"{k}={v}" for k, v in _setup_directives().items())
    cmd = [sys.executable, "-m", "cython", "-Wextra", "-X", directives,
           "-o", str(tmp_path / "out.c"), str(CPU.relative_to(REPO) / name)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output
    lines = output.splitlines()
    unparsed = [l for l in lines if "warning" in l.lower() and not WARNING.match(l)]
    assert not unparsed, "warnings in an unknown format:\n" + "\n".join(unparsed)
    fused = _fused_names()
    unexpected = [l for l in lines if (m := WARNING.match(l)) and not _is_fused_dispatch(m, fused)]
    # (a fused function's body warns once per specialisation: the same line twice)
    assert not unexpected, "cython -Wextra warnings:\n" + "\n".join(dict.fromkeys(unexpected))


def _line_of(name, prefix):
    lines = (CPU / name).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))


@pytest.mark.parametrize("name, prefix, col, msg, expected", [
    ("_roi_pool.pyx", "def forward(", 0, DISPATCH_MSG, True),
    ("_roi_pool.pyx", "def forward(", 4, DISPATCH_MSG, False),
    ("_roi_pool.pyx", "def forward(", 0, DISPATCH_MSG.replace("'arg'", "'x'"), False),
    ("_roi_align.pyx", "def forward_small(", 0, DISPATCH_MSG, False),  # no fused type
    ("_roi_align.pyx", "cdef void fill_box(", 0, DISPATCH_MSG, False),  # not a def
])
def test_only_the_fused_dispatch_warning_is_excused(name, prefix, col, msg, expected):
    w = {"path": str(CPU.relative_to(REPO) / name), "line": str(_line_of(name, prefix)),
         "col": str(col), "msg": msg}
    assert _is_fused_dispatch(w, _fused_names()) is expected
