"""bf16: the fraction of eidetic memory slots that token-by-token decoding and the parallel forward agree on.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/measure_bf16_memory_agreement.py --seeds 10

The tiny preset in bf16 with ``memory_size=8`` (eviction throughout), 8 rows x 256 tokens per seed, compared after
64, 128, 192 and 256 tokens (a parallel prefill of the prefix against the decoding state). The test
``tests/test_selection_options.py::test_bf16_decoding_keeps_the_parallel_forwards_memory_at_the_measured_rate``
runs seed 0 and asserts the measured rate with a margin.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import tiny_model, tokens  # noqa: E402
from test_selection_options import _slot_agreement  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoints = tuple(range(args.length // 4, args.length + 1, args.length // 4))
    same_all = total_all = 0
    for seed in range(args.seeds):
        model = tiny_model(seed=seed, dtype=torch.bfloat16, memory_size=8)
        with torch.no_grad():
            same, total = _slot_agreement(model, tokens(args.rows, args.length, seed=seed + 100), checkpoints)
        same_all, total_all = same_all + same, total_all + total
        print(f"seed {seed}: {same}/{total} = {same / total:.4f}")
    print(f"all: {same_all}/{total_all} = {same_all / total_all:.4f}")


if __name__ == "__main__":
    main()
