"""Typing: jaxreg ships py.typed, and user code reading outputs type-checks cleanly."""

import importlib.resources
import json
import pathlib
import shutil
import subprocess
import sys

import jaxreg

USER_CODE = pathlib.Path(__file__).parent / "typing" / "user_code.py"


def test_the_package_declares_its_types():
    assert (importlib.resources.files(jaxreg) / "py.typed").is_file()


def test_user_code_reading_outputs_is_pyright_clean():
    # Before: base_loss was ``TermOutput | None`` and total_grad_norm ``Array | None``, so
    # ``out.base_loss.grad_norm`` was reportOptionalMemberAccess in every user's code.
    pyright = shutil.which("pyright", path=str(pathlib.Path(sys.executable).parent))
    assert pyright is not None, "pyright is a dev dependency: pip install -e '.[dev]'"
    result = subprocess.run(
        [pyright, "--outputjson", "--pythonpath", sys.executable, str(USER_CODE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    assert errors == [], errors
    assert report["summary"]["filesAnalyzed"] == 1
