"""``python -m revq_ray.tune``.

Everything Ray pickles (the trial function, the configs it closes over) is defined in the package's modules,
never in this ``__main__``: Ray pickles functions and classes of ``__main__`` by value, and a pydantic model
unpickled that way in a trial process is a different class from the one the trial imports.
"""

import sys

from revq_ray.tune.cli import main

sys.exit(main())
