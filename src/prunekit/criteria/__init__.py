"""Built-in criteria, one module per family. Importing this package registers them."""
from . import basic, fisher, gradient, iterative, obs, paths, second_order_baselines, sensitivity  # noqa: F401
