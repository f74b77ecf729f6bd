"""Split into :mod:`prunekit.families.baselines.magni` (``magni``, ``globalmagni``) and
:mod:`prunekit.families.curvature` (``naivehess``, ``diagfisher``, ``kfac``); the public names stay importable here."""
from ..families.baselines.magni import GlobalMagniOptions, MagniOptions, globalmagni, magni  # noqa: F401
from ..families.curvature.common import MAX_BYTES  # noqa: F401
from ..families.curvature.diagfisher import DiagFisherOptions, diagfisher  # noqa: F401
from ..families.curvature.kfac import KFACFactors, KFACOptions, kfac, kfac_factors, kfac_update  # noqa: F401
from ..families.curvature.naivehess import NaiveHessOptions, hessian_diagonal, naivehess  # noqa: F401
