"""Step caches that skip most of the transformer on steps where its output barely changes.

settings.py: what a request asks for (plain data) and the published defaults.
decision.py: the skip metric, reduced over the ranks that hold parts of the same images.
hooks.py:    diffusers block hooks that run, skip and reuse the blocks.
job.py:      one sampling job's cache: per-branch state, step indices, the skip record.
families.py: which caches each model family offers, its TeaCache recipe, where its blocks find the layout.
"""
