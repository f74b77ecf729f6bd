"""The old home of the built-in criteria, now :mod:`prunekit.families` (one subpackage per family). Importing this
package registers every method; ``prunekit.criteria.<module>`` names keep working as aliases of the moved modules."""
from .. import families  # noqa: F401  (registers every method)
from . import basic, filters, fisher, gradient, iterative, obs, paths, pfp, second_order_baselines, sensitivity  # noqa: F401,E501
