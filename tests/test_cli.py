"""The `sfp` command line shell: help, version, error reporting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sfp import __version__
from sfp.cli.app import main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sfp {__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: sfp" in out


def test_console_script_runs():
    exe = sys.executable.replace("python", "sfp")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: sfp" in out.stdout
