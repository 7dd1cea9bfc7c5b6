"""Train a HuggingFace GPT-2 with DDG as it is: no wrapper, DDG traces it and cuts it into K
stages between its transformer blocks, and the trained weights are in the model you built
(``save_pretrained`` works). Nothing is downloaded: the model is built from a config (random
initialisation) and fed byte windows of the Shakespeare corpus.

    python examples/hf_gpt2.py --stages 4 --steps 200 --save runs/hf-gpt2

A stage boundary can also be named: ``split_points=["transformer.h.2", ...]`` (the blocks at
which stages 1..K-1 begin).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ddgpipe
from ddgpipe.data import BatchLoader, load_dataset
from ddgpipe.losses import token_cross_entropy
from ddgpipe.training import evaluate


def gpt2(layers: int, width: int, heads: int, context: int) -> GPT2LMHeadModel:
    """A random-init GPT-2 over bytes. Its embeddings are untied from the output projection:
    DDG refuses one tensor in the first and the last stage (two updates at two delays)."""
    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=width, n_layer=layers,
                        n_head=heads, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", help="a folder to save_pretrained the trained model to")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = gpt2(args.layers, args.width, heads=4, context=args.context)
    data = load_dataset("shakespeare", context=args.context)
    loader = BatchLoader(data.train_x, data.train_y, args.batch_size, seed=args.seed)
    pipe = ddgpipe.DDG(model, args.stages,
                       lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95),
                                                    weight_decay=0.1),
                       clip_grad=1.0, balance="params")
    print(f"GPT-2, {sum(p.numel() for p in model.parameters()):,} parameters, traced into "
          f"{sum(len(s.module) for s in pipe.stages)} blocks, cut at {pipe.split} into "
          f"{args.stages} stages ({pipe.executor_kind} executor)")
    batches = itertools.islice(itertools.chain.from_iterable(
        loader.epoch(e) for e in itertools.count()), args.steps)
    with pipe:
        for step, loss in enumerate(pipe.run(batches, token_cross_entropy), start=1):
            if step % 20 == 0 or step == args.steps:
                print(f"step {step:4d}  training loss {loss.item():.3f}")
        pipe.drain()
    val_loss, _ = evaluate(pipe, data.test_x, data.test_y, batch_size=64)
    print(f"held-out loss {val_loss:.3f} nats per byte ({val_loss / 0.6931:.3f} bits)")
    if args.save:
        pipe.model.save_pretrained(args.save)  # pipe.model is model, trained
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
