"""The public API type-checks: mypy on the public modules and on typed usage is clean, and it does
catch misuse (so the annotations are not Any in disguise)."""
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]' has it)")

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULES = ["roialign_cy/__init__.py", "roialign_cy/_api.py", "roialign_cy/_multiscale.py",
           "roialign_cy/_buffers.py", "roialign_cy/torch.py"]

# Modules reached through imports are analysed but only the files named are reported on;
# cupy ships no type information.
CONFIG = """\
[mypy]
follow_imports = silent
warn_unused_ignores = True
[mypy-cupy.*]
ignore_missing_imports = True
"""

GOOD = """\
from typing import Any, List, Tuple, Union, assert_type

import numpy as np
import torch
from numpy.typing import NDArray

import roialign_cy
import roialign_cy.torch as rt

Array = NDArray[Any]
f = np.zeros((1, 2, 8, 8), np.float32)
b = np.array([[0, 1.0, 1.0, 5.0, 5.0]], np.float32)
out = roialign_cy.roi_align(f, b, 2, 1.0, 2, True, layout="NCHW", n_threads=1)
assert_type(out, Array)
assert_type(roialign_cy.gradient_of("roi_align"), str)
assert_type(roialign_cy.devices_of("roi_align"), Tuple[str, ...])
assert_type(roialign_cy.roi_align_backward(out, f, b, 2), Array)
assert_type(roialign_cy.roi_align_backward(out, f.shape, b, 2, wrt="features"), Array)
assert_type(roialign_cy.roi_align_backward(out, f, b, 2, wrt="boxes"), Union[Array, List[Array]])
g_features, g_boxes = roialign_cy.roi_align_backward(out, f, b, 2, wrt="both")
assert_type(g_features, Array)
assert_type(roialign_cy.roi_align_rotated_backward(out, f, b, 2, wrt="both"),
            Tuple[Array, Union[Array, List[Array]]])
levels = roialign_cy.multi_scale_roi_align([f], b, 2, [1.0], assign="detectron2")
assert_type(roialign_cy.multi_scale_roi_align_backward(levels, [f], b, 2, [1.0]), List[Array])
assert_type(roialign_cy.multi_scale_roi_align_backward(levels, [f], b, 2, [1.0], wrt="both"),
            Tuple[List[Array], Union[Array, List[Array]]])

x = torch.from_numpy(f)
y: torch.Tensor = rt.roi_align(x, [torch.from_numpy(b[:, 1:])], (2, 2), 1.0, 2, True)
z: torch.Tensor = rt.roi_align_rotated(x, torch.zeros(1, 6), 2, clockwise=True)
pooler = rt.MultiScaleRoIAlign(["0"], 7, 2, canonical_scale=224)
p: torch.Tensor = pooler({"0": x}, [torch.from_numpy(b[:, 1:])], [(8, 8)])
m: torch.nn.Module = rt.RoIAlign(7, 0.25, 2, aligned=True)
assert_type(roialign_cy.set_output_cache(1 << 20), int)
assert_type(roialign_cy.output_cache()["idle_bytes"], int)
"""

# each line marked "# error" must be reported, and nothing else
BAD = """\
import numpy as np
import torch

import roialign_cy
import roialign_cy.torch as rt

f = np.zeros((1, 2, 8, 8), np.float32)
b = np.zeros((1, 5), np.float32)
roialign_cy.roi_align(f, b, 2, layout="NWHC")  # error
roialign_cy.roi_align_backward(b, f, b, 2, wrt="input")  # error
g: np.ndarray = roialign_cy.roi_align_backward(b, f, b, 2, wrt="both")  # error
roialign_cy.multi_scale_roi_align([f], b, 2, [1.0], assign="mmdet")  # error
rt.roi_align(torch.zeros(1), torch.zeros(1, 5), 2, aligned="yes")  # error
roialign_cy.set_output_cache(1.5e9)  # error
"""


def test_mypy_public_modules_and_usage(tmp_path):
    (tmp_path / "mypy.ini").write_text(CONFIG)
    good, bad = tmp_path / "typed_usage.py", tmp_path / "typed_misuse.py"
    good.write_text(GOOD)
    bad.write_text(BAD)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(tmp_path / "mypy.ini"),
         "--cache-dir", str(tmp_path / "cache"), *MODULES, str(good), str(bad)],
        cwd=REPO, capture_output=True, text=True)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    reported = {int(m.group(1)) for line in errors
                if (m := re.match(re.escape(str(bad)) + r":(\d+):", line))}
    expected = {i for i, line in enumerate(BAD.splitlines(), 1) if line.endswith("# error")}
    unexpected = [line for line in errors if not line.startswith(str(bad))]
    assert not unexpected, "mypy errors in the public modules or typed usage:\n" + "\n".join(unexpected)
    assert reported == expected, textwrap.dedent(f"""\
        mypy must report exactly the misuse lines {sorted(expected)}, got {sorted(reported)}:
        {result.stdout}{result.stderr}""")


def test_package_is_marked_typed():
    assert (REPO / "roialign_cy" / "py.typed").is_file()
