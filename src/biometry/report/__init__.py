"""What people look at: figures drawn from tables and arrays (no computation, no networks) and the
interactive explorer. May import ``config``, ``data`` and ``analysis``; never ``learn``, ``runs``
or ``cli``."""
