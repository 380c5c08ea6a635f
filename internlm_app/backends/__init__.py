"""The local engine's decoding parts: the decode plan, the one-reply worker, the continuous batch, KV reuse."""
