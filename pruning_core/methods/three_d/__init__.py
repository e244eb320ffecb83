"""3D pruning (depth, width, resolution under a FLOPs budget): Wang et al., ICML 2021, arXiv 2010.04879.

`run_3d(model, teacher, example_input_shape, spec, data, stage_progress, config=None) -> ThreeDResult`.
"""

from pruning_core.methods.three_d.run import PreSampled, ThreeDConfig, ThreeDResult, run_3d

__all__ = ["PreSampled", "ThreeDConfig", "ThreeDResult", "run_3d"]
