"""Train a HuggingFace GPT-2 with DDG: wrap it as an ``nn.Sequential`` of blocks, cut it into K
stages, feed it byte windows of the Shakespeare corpus. Nothing is downloaded: the model is
built from a config (random initialisation).

    python examples/hf_gpt2.py --stages 4 --steps 200

The wrapping is the part to copy: DDG cuts between the entries of a flat ``nn.Sequential``,
and each entry takes the previous one's output (a tensor, or a tuple passed as positional
arguments) and returns a tensor or a tuple of tensors.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import ddgpipe
from ddgpipe.data import BatchLoader, load_dataset
from ddgpipe.losses import token_cross_entropy
from ddgpipe.training import evaluate


class Embeddings(nn.Module):
    """Token ids ``[B, T]`` -> hidden states: GPT-2's token and position embeddings, dropout."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = transformer.wte, transformer.wpe, transformer.drop

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.wte(ids) + self.wpe(positions))


class Head(nn.Module):
    """The final LayerNorm and the projection to the vocabulary: logits ``[B, T, V]``."""

    def __init__(self, norm: nn.Module, projection: nn.Module):
        super().__init__()
        self.norm, self.projection = norm, projection

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projection(self.norm(hidden))


def gpt2_as_blocks(layers: int, width: int, heads: int, context: int) -> nn.Sequential:
    """A random-init GPT-2 as ``[embeddings, block_1 .. block_L, head]``. Its embeddings are
    untied from the output projection: a tensor in the first and the last stage would get two
    updates at two delays, which DDG refuses."""
    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=width, n_layer=layers,
                        n_head=heads, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    lm = GPT2LMHeadModel(config)
    gpt = lm.transformer
    return nn.Sequential(Embeddings(gpt), *gpt.h, Head(gpt.ln_f, lm.lm_head))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = gpt2_as_blocks(args.layers, args.width, heads=4, context=args.context)
    data = load_dataset("shakespeare", context=args.context)
    loader = BatchLoader(data.train_x, data.train_y, args.batch_size, seed=args.seed)
    pipe = ddgpipe.DDG(model, args.stages,
                       lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95),
                                                    weight_decay=0.1),
                       clip_grad=1.0, balance="params")
    print(f"GPT-2, {sum(p.numel() for p in model.parameters()):,} parameters, cut at blocks "
          f"{pipe.split} into {args.stages} stages ({pipe.executor_kind} executor)")
    batches = itertools.islice(itertools.chain.from_iterable(
        loader.epoch(e) for e in itertools.count()), args.steps)
    with pipe:
        for step, loss in enumerate(pipe.run(batches, token_cross_entropy), start=1):
            if step % 20 == 0 or step == args.steps:
                print(f"step {step:4d}  training loss {loss.item():.3f}")
        pipe.drain()
    val_loss, _ = evaluate(pipe, data.test_x, data.test_y, batch_size=64)
    print(f"held-out loss {val_loss:.3f} nats per byte ({val_loss / 0.6931:.3f} bits)")


if __name__ == "__main__":
    main()
