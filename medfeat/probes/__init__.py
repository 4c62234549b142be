"""medfeat.probes: linear probes on stored features, with grouped CV and CIs.

Library first, CLI second (``medfeat probe ...``):

* :mod:`.features`: X, y, groups from a feature store and a labels manifest;
* :mod:`.pairs`: baseline/follow-up feature combination;
* :mod:`.splits`: cross-validation grouped by subject;
* :mod:`.linear`: :class:`LinearProbe` and :class:`KNNProbe` (scikit-learn contract);
* :mod:`.heads` and :mod:`.headfit`: trained heads on stored vectors or token maps (MLP,
  attentive pooling, the study's DeiT head) as :class:`~.headfit.HeadProbe`;
* :mod:`.metrics` and :mod:`.stats`: metrics, bootstrap CIs, paired tests (DeLong);
* :mod:`.evaluate`: :func:`cross_validate_probe`, :func:`holdout_probe`, :func:`compare_probes`;
* :mod:`.sweep`, :mod:`.report` and :mod:`.transfer_report`: all arrays of a store into a
  table, Markdown and figures; the transfer study's per-dataset tables.
"""
from medfeat.probes.evaluate import ProbeResult, compare_probes, cross_validate_probe, holdout_probe
from medfeat.probes.features import FeatureSet, load_features
from medfeat.probes.linear import KNNProbe, LinearProbe

__all__ = ["FeatureSet", "KNNProbe", "LinearProbe", "ProbeResult", "compare_probes", "cross_validate_probe",
           "holdout_probe", "load_features"]
