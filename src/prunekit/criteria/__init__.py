"""Built-in criteria, one module per family. Importing this package registers them."""
from . import basic, filters, fisher, gradient, iterative, obs, paths, pfp, second_order_baselines, sensitivity  # noqa: F401
