"""Bridges: learned cross-attention from a frozen student's kept (retrieval) heads into an outside memory.

See docs/bridge.md. ``KeptHeadBridge`` (the heads' own queries, learned K/V from the memory, a gate at 0),
``FullWidthBridge`` (the composition-paper baseline), ``load_bridge``, the sources (another model's hidden states,
a chunk autoencoder) and the ``kv-outside`` task.
"""

from radistill.utils.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.bridge.module": ("Bridge", "BridgeConfig", "FullWidthBridge", "KeptHeadBridge", "load_bridge",
                                "make_bridge", "memory_attention"),
    "radistill.bridge.chunk_ae": ("ChunkAEConfig", "ChunkAutoencoder", "load_chunk_ae", "round_trip_accuracy",
                                  "train_chunk_ae"),
    "radistill.bridge.sources": ("ChunkSource", "HiddenStateSource", "parse_source"),
})

__all__ = ["Bridge", "BridgeConfig", "ChunkAEConfig", "ChunkAutoencoder", "ChunkSource", "FullWidthBridge",
           "HiddenStateSource", "KeptHeadBridge", "load_bridge", "load_chunk_ae", "make_bridge", "memory_attention",
           "parse_source", "round_trip_accuracy", "train_chunk_ae"]
