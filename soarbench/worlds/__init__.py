"""Procedural worlds: small synthetic text-to-image domains whose benchmarks can be scored exactly."""
