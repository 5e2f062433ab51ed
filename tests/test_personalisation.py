"""The run's personalisation figures from each label's distance to its attempt."""

from persd_online.personalisation import LabelDistance, label_distance, summarise


def test_label_distance_compares_label_and_reference_with_the_same_attempt():
    attempt = "def f(x):\n    y = x + 1\n    return y\n"
    label = "def f(x):\n    y = x + 2\n    return y\n"
    reference = "def f(x):\n    return x + 2\n"
    d = label_distance("a1", "self", label, attempt, reference)
    assert (d.tier, d.label_ratio) == ("self", round(1 / 3, 4)) and d.reference_ratio == round(2 / 3, 4)
    assert label_distance("a2", "openai", label, attempt, None).reference_ratio is None


def test_summary_medians_per_tier_and_share_closer_than_the_reference():
    labels = [LabelDistance("a", "self", 0.1, 0.5, -0.5, -1.0), LabelDistance("b", "reference_repair", 0.2, 0.2),
              LabelDistance("c", "reference_repair", 0.3, 0.9, -0.9, -0.8), LabelDistance("d", "openai", 0.4, None)]
    s = summarise(labels)
    assert s["labels"] == 4 and s["by_tier"] == {"self": 1, "reference_repair": 2, "openai": 1}
    assert s["median_edit_ratio"] == 0.25 and s["median_reference_edit_ratio"] == 0.5
    assert s["closer_than_reference"] == round(2 / 3, 4)  # ties are not closer
    assert s["logprobs_measured"] == 2 and s["median_logprob_gap"] == 0.2 and s["more_likely_than_reference"] == 0.5
    assert summarise([])["median_edit_ratio"] is None
