"""Time per generated token of ``generate()`` (greedy) after a long prompt: the path users and ``bmojo generate``
take. With the fixed-size cache in use the time is flat in the context length; a lost cache (every step
recomputing the prefix) makes it grow with the context.

    .venv/bin/python scripts/bench_generate.py --preset cpu --contexts 1024 4096 --new-tokens 9 --threads 1

Prints, per context, the median wall time of the model's forward over the steps after the prompt, and how many
tokens each of those steps fed (1 when the cache is used).
"""

import argparse
import statistics
import time

import torch

from bmojo import BMojoForCausalLM, preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BMojoForCausalLM(preset_config(args.preset)).eval()
    print(
        f"model: preset {args.preset!r}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"layers {model.config.layers_block_type}, window {model.config.window_size}, "
        f"memory {model.config.memory_size}; torch threads {args.threads}"
    )
    calls = []
    model.model.register_forward_pre_hook(lambda m, a: calls.append([a[0].shape[1], time.perf_counter()]))
    model.model.register_forward_hook(lambda *a: calls[-1].append(time.perf_counter()))
    for context in args.contexts:
        prompt = torch.randint(3, model.config.vocab_size, (1, context))
        calls.clear()
        with torch.no_grad():
            model.generate(
                prompt,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        steps = calls[1:]
        ms = statistics.median((end - start) * 1e3 for _, start, end in steps)
        fed = sorted({n for n, _, _ in steps})
        print(
            f"context {context:>6}: {ms:8.1f} ms per generated token (median of {len(steps)}), "
            f"tokens fed per step {fed}"
        )


if __name__ == "__main__":
    main()
