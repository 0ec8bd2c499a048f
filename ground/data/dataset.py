"""The run's data, loaded once from its config: unlabelled imagery (the teacher labels it),
labelled samples, the held-out evaluation image(s), and the normalisation fitted on the training
imagery."""
from __future__ import annotations

from dataclasses import dataclass, field

from ground.config import RunConfig
from ground.data.normalization import Normalization
from ground.data.sample import Sample, bin_sample
from ground.data.sources import load_source


@dataclass
class Data:
    unlabelled: list[Sample]
    labelled: list[Sample]
    eval: Sample | None               # the first evaluation image (figures)
    norm: Normalization
    inputs: dict = field(default_factory=dict)
    evals: list = field(default_factory=list)   # every evaluation image (a patch split may hold many)

    def distill_samples(self, with_labels: bool) -> list[Sample]:
        """Teacher-labelled imagery; with_labels adds the labelled samples (their labels kept) and
        drops their unlabelled duplicates."""
        if not with_labels:
            return self.unlabelled + [Sample(s.image, None, s.name, s.files) for s in self.labelled
                                      if s.digest() not in {u.digest() for u in self.unlabelled}]
        seen = {s.digest() for s in self.labelled}
        return self.labelled + [s for s in self.unlabelled if s.digest() not in seen]


def load_data(cfg: RunConfig) -> Data:
    K, f = len(cfg.classes), cfg.gsd_factor
    # at a processing GSD (data.gsd_m) every image and label map is binned as the daemon bins
    # frames, before the teacher labels it and before the normalisation is fitted
    unlabelled = [bin_sample(s, f) for spec in cfg.unlabelled
                  for s in load_source(spec, cfg.bands, "train", K, labelled=False, held_out=cfg.held_out)]
    labelled = [bin_sample(s, f) for spec in cfg.labelled
                for s in load_source(spec, cfg.bands, "train", K, held_out=cfg.held_out)]
    evals = [bin_sample(s, f) for s in load_source(cfg.eval_data, cfg.bands, "eval", K)] \
        if cfg.eval_data is not None else []
    ev = evals[0] if evals else None
    seen, train_imagery = set(), []
    for s in unlabelled + labelled:
        if s.digest() not in seen:
            seen.add(s.digest())
            train_imagery.append(s)
    norm = Normalization.fit(train_imagery, cfg.bands)
    inputs = {f"image:{s.name}": s.digest() for s in unlabelled + labelled + evals}
    return Data(unlabelled, labelled, ev, norm, inputs, evals)
