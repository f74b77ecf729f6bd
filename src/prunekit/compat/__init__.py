"""Readers of the source systems' own formats, translated into prunekit's config fields.

- :mod:`.fts_json`: seed 000's JSON experiment files (the FTS repository's ``exp_configs/*.json``);
- :mod:`.incop_flags`: seed 001's command-line parameters (the InCoP repository) as top-level config keys.

The WoodFisher (seed 003) flags need no code: each is a ``--set`` key of a prunekit config
(docs/woodfisher_flags.md). :func:`prunekit.experiments.config.translate` applies both readers before a config is
parsed.
"""
