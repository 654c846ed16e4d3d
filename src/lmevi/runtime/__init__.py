"""The runtime layer: what lmevi needs of JAX, XLA and the host, set up at the first fit and never at import.

``xla`` (XLA's CPU flags, the backend started beside the design stage), ``pages`` (NumPy's huge pages off
while building), ``cache`` (lmevi's cache folder) and ``trust`` (reading it only where no one else can write),
``jit`` (``sized_jit`` and executables kept on disk), ``lapack`` (LAPACK for loaded executables),
``precision`` (64-bit arithmetic scoped to lmevi's own calls), ``collective`` (sums across the processes of a
multi-process fit) and ``options`` (the checks of user-facing options).

It is the bottom layer: every other layer may import it, and it imports nothing else of lmevi.
"""
