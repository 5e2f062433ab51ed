"""How the sandbox starts its own Python processes (workers, and zygotes)."""

from __future__ import annotations

import sys
from pathlib import Path


def boot_command(module: str, *args: str) -> list[str]:
    """``python -I -S -c`` running ``module.main()`` from this very copy of the sandbox package.

    ``-I -S``: no ``PYTHON*`` variable, user site or ``.pth`` file reaches the sandbox's processes, which need
    only the standard library and this package (and each starts ~12 ms sooner, ``site`` not run).
    """
    boot = f"import sys; sys.path.insert(0, sys.argv.pop(1)); from {module} import main; main()"
    return [sys.executable, "-I", "-S", "-c", boot, str(Path(__file__).resolve().parents[1]), *args]
