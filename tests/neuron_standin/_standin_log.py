"""The call log shared by the stand-ins: one JSON object a line in ``$BMOJO_STANDIN_LOG/rank{R}.jsonl``."""

import json
import os


def record(call: str, **fields) -> None:
    folder = os.environ.get("BMOJO_STANDIN_LOG")
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"call": call, **fields}) + "\n")
