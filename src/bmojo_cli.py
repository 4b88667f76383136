"""The entry point of the ``bmojo`` command (``[project.scripts]``; also ``python -m bmojo_cli``).

``import bmojo`` imports torch and transformers to register the model with the Auto classes (2-4 s; 10 s on a
busy machine), and importing ``bmojo.cli`` the usual way runs that first. The parser needs neither, so this
entry point creates the package module without running its ``__init__``, parses the arguments (``--help`` and
argument errors end here, in well under a second), and runs ``__init__`` before a command runs, so the command
sees the package exactly as ``import bmojo`` makes it. It also sets ``OMP_WAIT_POLICY`` before torch loads
(``bmojo.cli.set_thread_environment``), which ``python -m bmojo.cli`` comes too late to do.
"""

from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    if "bmojo" in sys.modules:  # already imported: nothing to save
        from bmojo.cli import main as cli_main

        return cli_main(argv)
    spec = importlib.util.find_spec("bmojo")
    package = importlib.util.module_from_spec(spec)  # the module object; bmojo/__init__.py has not run
    sys.modules["bmojo"] = package
    try:
        from bmojo import cli

        args = cli.parse_args(argv)
    except BaseException:  # --help, an argument error: leave no half-made package behind for a later import
        for name in [n for n in sys.modules if n == "bmojo" or n.startswith("bmojo.")]:
            del sys.modules[name]
        raise
    cli.set_thread_environment()  # before torch loads OpenMP
    spec.loader.exec_module(package)
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
