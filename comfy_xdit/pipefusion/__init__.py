"""PipeFusion (xDiT): transformer layers split over pipeline stages, the image over patches.

partition.py  which blocks each stage holds (balanced by parameter count)
stage.py      the stage module (diffusers' model with only its layers) and its loader
attention.py  patch attention against the one-step-stale K/V of the other patches
runner.py     one model evaluation through the pipeline (point-to-point sends between stages)
"""
