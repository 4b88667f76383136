#!/usr/bin/env python3
"""Is this machine ready to train, compile or export bmojo on Trainium? Runs ``bmojo.trn1.environment``.

    python neuron/check_env.py --for train|compile|export [--cores N]

The launchers (neuron/lib.sh) call this before anything else. The checker is run by its path in this checkout
(src/bmojo/trn1/environment.py, standard library only) instead of ``python -m bmojo.trn1.environment``, because
importing the bmojo package imports torch and transformers: the check must still report, one line per missing piece,
where those are missing or bmojo is not installed yet.
"""

import runpy
from pathlib import Path

CHECKER = Path(__file__).resolve().parents[1] / "src" / "bmojo" / "trn1" / "environment.py"

if __name__ == "__main__":
    runpy.run_path(str(CHECKER), run_name="__main__")
