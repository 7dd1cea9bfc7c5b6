"""Split a model that is not an ``nn.Sequential`` (a HuggingFace causal LM, say) into the
blocks DDG cuts, by torch's own tracing; the blocks hold the user's parameters."""

from ddgpipe.trace.blocks import as_pipeline_blocks
from ddgpipe.trace.candidates import repeated_blocks
from ddgpipe.trace.chain import TracedBlock

__all__ = ["as_pipeline_blocks", "repeated_blocks", "TracedBlock"]
