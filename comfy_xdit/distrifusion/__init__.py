"""DistriFusion (Li et al., 2024): displaced patch parallelism.

attention.py  a patch's attention against fresh own and one-step-stale other patches' K/V,
              exchanged with an asynchronous all-gather
runner.py     the family denoiser on a patch mesh: warmup bookkeeping, branches, per-job reset
"""
