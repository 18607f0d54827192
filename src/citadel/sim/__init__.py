"""A simulated OpenAI-compatible model server that behaves like vLLM: the embedded default upstream,
the upstream of every test and benchmark, and a source of faults on demand.

``config`` holds the settings and flags, ``text`` the deterministic output, ``faults`` the fault
decisions (both pure), ``job`` the validated and planned request, ``bodies`` the bytes on the wire,
and ``app`` the HTTP handlers, streaming and metrics; ``citadel sim`` runs it.
"""
