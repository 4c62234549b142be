"""SimpleITK registration on the same pairs: the independent reference for medfeat.kernels.align."""
from __future__ import annotations

import numpy as np


def to_sitk(data: np.ndarray, affine: np.ndarray):
    """ITK image of a (D, H, W) array with a voxel -> world affine (ITK index x = array axis 2)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(data, dtype=np.float32))
    m = np.asarray(affine, dtype=np.float64)[:3, :3][:, ::-1]
    spacing = np.linalg.norm(m, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((m / spacing).ravel().tolist())
    img.SetOrigin(np.asarray(affine, dtype=np.float64)[:3, 3].tolist())
    return img


def transform_to_matrix(tx) -> np.ndarray:
    """4x4 of an affine ITK transform, read off by mapping the origin and the unit vectors."""
    o = np.array(tx.TransformPoint((0.0, 0.0, 0.0)))
    out = np.eye(4)
    out[:3, 3] = o
    for j in range(3):
        e = [0.0, 0.0, 0.0]
        e[j] = 1.0
        out[:3, j] = np.array(tx.TransformPoint(tuple(e))) - o
    return out


def sitk_register(moving, fixed, a_mov, a_fix, kind: str = "rigid", seed: int = 1) -> np.ndarray:
    """Fixed-world -> moving-world 4x4 from SimpleITK (correlation metric, 3-level pyramid).

    ``seed`` of the random metric sampling; 0 would be SimpleITK's ``sitkWallClock``
    (a new sample set every call), so the default is a fixed 1.
    """
    import SimpleITK as sitk

    f, m = to_sitk(fixed, a_fix), to_sitk(moving, a_mov)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    base = sitk.Euler3DTransform() if kind == "rigid" else sitk.AffineTransform(3)
    init = sitk.CenteredTransformInitializer(f, m, base, sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg.SetInitialTransform(init, inPlace=False)
    return transform_to_matrix(reg.Execute(f, m))
