"""pipeline.experiment's choices that need no Ray: when the final evaluation stands for the
last epoch's validation."""

from __future__ import annotations

from pipeline.experiment import final_evaluation_validates


def test_final_evaluation_validates_only_at_the_validation_threshold(tiny_config):
    # tiny.yaml: score_threshold 0.05, the lowest of eval.score_thresholds (default)
    assert final_evaluation_validates(tiny_config())
    assert final_evaluation_validates(tiny_config("eval.score_thresholds=[]"))
    # the final pass predicts at 0.05, validation would at 0.1: different predictions
    assert not final_evaluation_validates(tiny_config("model.score_threshold=0.1"))
    assert not final_evaluation_validates(tiny_config("eval.score_thresholds=[0.01,0.05]"))
