"""DiTFastAttn (Yuan et al. 2024): attention compressed per layer and per step.

settings.py:    what a request asks for (threshold, window, whether CFG sharing may be chosen).
plan.py:        the per-(layer, step) plan of methods, as plain data.
attention.py:   full and 1-D window attention on [B, S, H, D] tensors.
calibration.py: the greedy choice of the most compressed method under the threshold, on errors
                reduced over the ranks so every rank picks the same method.
processor.py:   the Flux attention processor that carries out (or calibrates) the plan.
job.py:         one sampling job: processors in for the job, the step of each call, the plan store.
"""
